from .demo import make_demo_dataset
from .errors import DatasetError
from .mvtec import check_datalist, mvtec_datalist, split_train_validation
from .sources import image_folder_datalist, resolve_dataset_dir, synthetic_validation_datalist
from .bmad import bmad_datalist
from .volumes import check_dicom_series, check_image_label_pair, load_volume, multimodal_volume
