from .demo import make_demo_dataset
from .errors import CheckpointError, DatasetError
from .nifti_io import save_nifti
from .mvtec import check_datalist, mvtec_datalist, readable_datalist, report_skipped_files, split_train_validation
from .sources import image_folder_datalist, resolve_dataset_dir, synthetic_validation_datalist
from .bmad import bmad_datalist
from .volumes import check_dicom_series, check_image_label_pair, load_volume, multimodal_volume, restore_stored_orientation
from .demo_volumes import DEMO_VOLUME_FILES, make_demo_volumes
from .cases import (
    VOLUME_EXTENSIONS,
    case_folder_datalist,
    lesion_slice_datalist,
    normal_slice_datalist,
    readable_volume_datalist,
    resolve_volume_dataset_dir,
    split_cases,
    volume_folder_datalist,
    volume_inference_datalist,
    volume_stem,
)
from .run_record import (
    DEMO_SOURCE,
    MODEL_SETTINGS,
    RUN_RECORD,
    ModelFingerprint,
    check_model_fingerprint,
    check_model_settings,
    check_training_run,
    chosen_dataset_dir,
    read_run_record,
    recorded_case_split,
)
