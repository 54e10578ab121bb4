"""Data sets of REFERS as `datasets.DatasetDict`s (splits `train`, `validation`, `test`).

Source domain (image + report studies): rows `study_id`, `patient_id`, `images` (List(Image())),
`view_positions` (List(string), same length), `report` (findings + impression).
Target domain (labels): rows `image_id`, `patient_id`, `image` (Image()), `labels`: a float32 multi-hot
list of length C (NIH ChestX-ray14, VinBigData) or a ClassLabel (Shenzhen TB, the COVID-19 tasks, the Kermany
pneumonia tasks).

All builders read the files as distributed, validate them, and return in-memory datasets (nothing is
written to the `datasets` cache). `SAMPLE_DATA_DIR` is the small real sample shipped with the repository and
installed with the package (same layout as ../shared/data).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from datasets import DatasetDict

from .common import SPLITS, InvalidDataError
from .covid19_collection import (
    COVID_LABEL_NAMES,
    VIRAL_BACTERIAL_LABEL_NAMES,
    load_covid19_collection,
    load_covid19_studies,
)
from .chexpert import CHEXPERT_CITATION, CHEXPERT_LABEL_NAMES, CHEXPERT_LICENSE, load_chexpert
from .iu_xray import load_iu_xray
from .kermany_pneumonia import (
    KERMANY_BACTERIAL_VIRAL_LABEL_NAMES,
    KERMANY_CITATION,
    KERMANY_LICENSE,
    KERMANY_PNEUMONIA_LABEL_NAMES,
    kermany_records,
    load_kermany_pneumonia,
)
from .kermany_paired_reports import load_kermany_paired_reports
from .label_ratio import sample_label_ratio, select_by_ids
from .labelled_images import label_info, load_labelled_images
from .mimic_cxr import load_mimic_cxr
from .nih_chestxray14 import NIH_LABEL_NAMES, NIH_SPLIT_FILE_LABEL_ORDER, load_nih_chestxray14
from .reports import extract_findings_impression
from .rsna_pneumonia import (
    RSNA_PNEUMONIA_CITATION,
    RSNA_PNEUMONIA_LABEL_NAMES,
    RSNA_PNEUMONIA_LICENSE,
    load_rsna_pneumonia,
)
from .shenzhen_tb import SHENZHEN_LABEL_NAMES, load_shenzhen_tb
from .siim_acr_pneumothorax import SIIM_CITATION, SIIM_LABEL_NAMES, SIIM_LICENSE, load_siim_acr_pneumothorax
from .study_folder import load_study_folder
from .vinbigdata import VINBIGDATA_CLASS_IDS, VINBIGDATA_LABEL_NAMES, dicom_to_uint8, load_vinbigdata



def _sample_data_dir() -> Path:
    """sample_data/: inside the package when installed (setup.py ships it as `datasets_scripts/sample_data`), beside
    the package in a source checkout or an editable install. A copy without it gets the installed location, which
    `check_data_dir` then reports as missing, saying what to pass."""
    installed = Path(str(resources.files(__name__) / "sample_data"))
    checkout = Path(__file__).resolve().parents[1] / "sample_data"
    return installed if installed.is_dir() or not checkout.is_dir() else checkout


SAMPLE_DATA_DIR = _sample_data_dir()


def check_data_dir(data_dir, flag: str = "--data_dir", what: str = "the data set's folder") -> Path:
    """`data_dir` as a Path if it is a folder; else FileNotFoundError naming `flag` and what to pass instead (and
    that this copy of refers has no sample data, when the missing folder is the default inside SAMPLE_DATA_DIR)."""
    path = Path(data_dir)
    if path.is_dir():
        return path
    message = f"{flag} {os.fspath(data_dir)!r}: no such folder; pass {flag} with {what}"
    if path.resolve().is_relative_to(SAMPLE_DATA_DIR.resolve()):
        message += (f" (the default is the sample data shipped with refers, and this installation has no "
                    f"{os.fspath(SAMPLE_DATA_DIR)!r}: install refers with `pip install .` from a checkout, or pass "
                    f"your own data)")
    raise FileNotFoundError(message)


@dataclass(frozen=True)
class TargetDatasetSpec:
    """A fine-tuning data set: its loader `loader(data_dir, **kw) -> DatasetDict`, class names in label
    order, the `problem_type` for `PretrainedConfig`, and the folder name of its split lists under `splits/`.
    `license` (a Hub licence id) and `citation` (whom to attribute) where the registry records them;
    `display_name` is how cards and reports name it (e.g. "NIH ChestX-ray14"); `zero_shot_prompts` are the class
    sentences zero-shot classification compares studies with."""

    name: str
    loader: Callable[..., DatasetDict]
    label_names: tuple[str, ...]
    problem_type: str
    default_split_dir: str
    license: str | None = None
    citation: str | None = None
    display_name: str | None = None
    # zero-shot prompts, editable: {label: (positive sentence, negative sentence)} (`tasks.zero_shot.load_prompts`)
    zero_shot_prompts: dict[str, tuple[str, str]] | None = field(default=None, hash=False)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def with_labels_of(self, dataset) -> "TargetDatasetSpec":
        """This spec; or, when its labels come from the data (empty `label_names`: `labelled_images`), a copy with
        the label names and problem type of `dataset` (a split its loader built, see `labelled_images.label_info`)."""
        if self.label_names:
            return self
        found = label_info(dataset)
        if found is None:
            raise ValueError(f"{self.name}: the data set does not record its label names and problem type (expected "
                             "a split built by its loader, or a ClassLabel 'labels' column)")
        return dataclasses.replace(self, label_names=found[0], problem_type=found[1])


def _absent(finding: str) -> tuple[str, str]:
    return f"There is {finding}.", f"There is no {finding}."


NIH_PROMPTS = {
    "Atelectasis": _absent("atelectasis"), "Cardiomegaly": _absent("cardiomegaly"),
    "Consolidation": _absent("consolidation"), "Edema": _absent("pulmonary edema"),
    "Effusion": _absent("pleural effusion"), "Emphysema": _absent("emphysema"),
    "Fibrosis": _absent("pulmonary fibrosis"), "Hernia": _absent("a hiatal hernia"),
    "Infiltration": _absent("an infiltrate"), "Mass": _absent("a lung mass"), "Nodule": _absent("a lung nodule"),
    "Pleural_Thickening": _absent("pleural thickening"), "Pneumonia": _absent("pneumonia"),
    "Pneumothorax": _absent("a pneumothorax"),
}
COVID_PROMPTS = {
    "non-COVID-19": ("Findings are not those of COVID-19.", "Findings consistent with COVID-19 pneumonia."),
    "COVID-19": ("Findings consistent with COVID-19 pneumonia.", "Findings are not those of COVID-19."),
}
VIRAL_BACTERIAL_PROMPTS = {
    "bacterial": ("Bacterial pneumonia.", "Viral pneumonia."),
    "viral": ("Viral pneumonia.", "Bacterial pneumonia."),
}
KERMANY_PNEUMONIA_PROMPTS = {
    "normal": ("There is no pneumonia.", "There is pneumonia."),
    "pneumonia": ("There is pneumonia.", "There is no pneumonia."),
}
KERMANY_BACTERIAL_VIRAL_PROMPTS = {
    "normal": ("There is no pneumonia.", "There is pneumonia."),
    "bacterial": ("Findings consistent with bacterial pneumonia.", "There is no bacterial pneumonia."),
    "viral": ("Findings consistent with viral pneumonia.", "There is no viral pneumonia."),
}


TARGET_DATASETS: dict[str, TargetDatasetSpec] = {
    spec.name: spec
    for spec in (
        TargetDatasetSpec("nih_chestxray14", load_nih_chestxray14, NIH_LABEL_NAMES,
                          "multi_label_classification", "nih_chestxray14", display_name="NIH ChestX-ray14",
                          zero_shot_prompts=NIH_PROMPTS),
        TargetDatasetSpec("vinbigdata", load_vinbigdata, VINBIGDATA_LABEL_NAMES,
                          "multi_label_classification", "vinbigdata", display_name="VinBigData Chest X-ray"),
        TargetDatasetSpec("shenzhen_tb", load_shenzhen_tb, SHENZHEN_LABEL_NAMES,
                          "single_label_classification", "shenzhen_tb", display_name="Shenzhen Tuberculosis"),
        TargetDatasetSpec("covid19", functools.partial(load_covid19_collection, task="covid"), COVID_LABEL_NAMES,
                          "single_label_classification", "covid19_collection",
                          display_name="COVID-19 Image Data Collection (COVID-19 vs other)", zero_shot_prompts=COVID_PROMPTS),
        TargetDatasetSpec("covid19_viral_bacterial", functools.partial(load_covid19_collection, task="viral_bacterial"),
                          VIRAL_BACTERIAL_LABEL_NAMES, "single_label_classification", "covid19_collection",
                          display_name="COVID-19 Image Data Collection (viral vs bacterial)",
                          zero_shot_prompts=VIRAL_BACTERIAL_PROMPTS),
        # No split lists (`default_split_dir` is not a folder): official test/ as test, seeded patient-level validation.
        TargetDatasetSpec("kermany_pneumonia", functools.partial(load_kermany_pneumonia, task="pneumonia"),
                          KERMANY_PNEUMONIA_LABEL_NAMES, "single_label_classification", "kermany_pneumonia",
                          KERMANY_LICENSE, KERMANY_CITATION,
                          display_name="Kermany pediatric chest X-rays (normal vs pneumonia)",
                          zero_shot_prompts=KERMANY_PNEUMONIA_PROMPTS),
        TargetDatasetSpec("kermany_bacterial_viral", functools.partial(load_kermany_pneumonia, task="bacterial_viral"),
                          KERMANY_BACTERIAL_VIRAL_LABEL_NAMES, "single_label_classification", "kermany_pneumonia",
                          KERMANY_LICENSE, KERMANY_CITATION,
                          display_name="Kermany pediatric chest X-rays (normal / bacterial / viral pneumonia)",
                          zero_shot_prompts=KERMANY_BACTERIAL_VIRAL_PROMPTS),
        # MRM's downstream tasks with MRM's split lists (splits/mrm/...; label_ratio=0.01 / 0.1 / 1.0 picks its
        # train_1 / train_10 / train_list). SIIM also has a `mask` column (pneumothorax segmentation).
        TargetDatasetSpec("chexpert", load_chexpert, CHEXPERT_LABEL_NAMES, "multi_label_classification",
                          "mrm/CheXpert", CHEXPERT_LICENSE, CHEXPERT_CITATION, display_name="CheXpert"),
        TargetDatasetSpec("rsna_pneumonia", load_rsna_pneumonia, RSNA_PNEUMONIA_LABEL_NAMES,
                          "single_label_classification", "mrm/RSNA_Pneumonia", RSNA_PNEUMONIA_LICENSE,
                          RSNA_PNEUMONIA_CITATION, display_name="RSNA Pneumonia Detection Challenge"),
        TargetDatasetSpec("siim_acr_pneumothorax", load_siim_acr_pneumothorax, SIIM_LABEL_NAMES,
                          "single_label_classification", "mrm/SIIM-ACR_Pneumothorax", SIIM_LICENSE, SIIM_CITATION,
                          display_name="SIIM-ACR Pneumothorax"),
        # Your own data: label names and problem type come from the data (`TargetDatasetSpec.with_labels_of`).
        TargetDatasetSpec("labelled_images", load_labelled_images, (), "", "labelled_images",
                          display_name="a folder of labelled images"),
    )
}



@dataclass(frozen=True)
class SourceDatasetSpec:
    """A pretraining data set (studies with reports): its loader `loader(data_dir, ...) -> DatasetDict` and how cards
    and reports name it."""

    name: str
    loader: Callable[..., DatasetDict]
    display_name: str


SOURCE_DATASETS: dict[str, SourceDatasetSpec] = {
    spec.name: spec
    for spec in (
        SourceDatasetSpec("mimic_cxr", load_mimic_cxr, "MIMIC-CXR"),
        SourceDatasetSpec("iu_xray", load_iu_xray, "IU X-ray (Open-i)"),
        SourceDatasetSpec("study_folder", load_study_folder, "a folder of studies with reports"),
        SourceDatasetSpec("covid19_studies", load_covid19_studies,
                          "COVID-19 Image Data Collection studies (clinical notes as reports)"),
        SourceDatasetSpec("kermany_paired_reports", load_kermany_paired_reports,
                          "Kermany pediatric radiographs paired by finding with Open-i reports of other patients "
                          "(a controlled check, not paired clinical data)"),
    )
}


def dataset_display_name(name: str) -> str:
    """How cards and reports name a registry data set (`TARGET_DATASETS` or `SOURCE_DATASETS`), e.g.
    "nih_chestxray14" -> "NIH ChestX-ray14"; a name the registry does not know is returned as it is."""
    spec = TARGET_DATASETS.get(name) or SOURCE_DATASETS.get(name)
    return (spec.display_name or spec.name) if spec is not None else name


def load_target_dataset(name: str, data_dir, **kwargs) -> DatasetDict:
    """`TARGET_DATASETS[name].loader(data_dir, **kwargs)`; ValueError listing the valid names otherwise."""
    if name not in TARGET_DATASETS:
        raise ValueError(f"unknown target data set {name!r}; valid names: {', '.join(sorted(TARGET_DATASETS))}")
    loader = TARGET_DATASETS[name].loader
    fixed = sorted(set(getattr(loader, "keywords", {})) & set(kwargs))
    if fixed:
        raise ValueError(f"{', '.join(fixed)} is fixed by the data set name {name!r}; do not pass it")
    return loader(data_dir, **kwargs)


def load_source_dataset(name: str, *args, **kwargs) -> DatasetDict:
    """`SOURCE_DATASETS[name](*args, **kwargs)`; ValueError listing the valid names otherwise."""
    if name not in SOURCE_DATASETS:
        raise ValueError(f"unknown source data set {name!r}; valid names: {', '.join(sorted(SOURCE_DATASETS))}")
    return SOURCE_DATASETS[name].loader(*args, **kwargs)


__all__ = [
    "SAMPLE_DATA_DIR", "check_data_dir", "SPLITS", "InvalidDataError", "TargetDatasetSpec", "TARGET_DATASETS",
    "SourceDatasetSpec", "SOURCE_DATASETS", "dataset_display_name",
    "load_target_dataset", "load_source_dataset", "load_mimic_cxr", "load_iu_xray", "load_study_folder",
    "load_covid19_studies", "load_nih_chestxray14", "load_vinbigdata", "load_shenzhen_tb", "load_covid19_collection",
    "sample_label_ratio", "select_by_ids", "extract_findings_impression", "dicom_to_uint8", "NIH_LABEL_NAMES",
    "NIH_SPLIT_FILE_LABEL_ORDER", "VINBIGDATA_LABEL_NAMES", "VINBIGDATA_CLASS_IDS", "SHENZHEN_LABEL_NAMES",
    "COVID_LABEL_NAMES", "VIRAL_BACTERIAL_LABEL_NAMES", "load_labelled_images", "label_info",
    "load_kermany_pneumonia", "kermany_records", "load_chexpert", "load_rsna_pneumonia", "load_siim_acr_pneumothorax",
    "CHEXPERT_LABEL_NAMES", "RSNA_PNEUMONIA_LABEL_NAMES", "SIIM_LABEL_NAMES", "load_kermany_paired_reports", "KERMANY_PNEUMONIA_LABEL_NAMES", "KERMANY_BACTERIAL_VIRAL_LABEL_NAMES",
]
