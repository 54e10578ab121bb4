"""IU X-ray (Open-i, Indiana University): XML reports + PNG images -> source-domain studies.

Inputs: `NLMCXR_reports.tgz` (or its extracted `ecgen-radiology/` folder of XMLs) and the image folder
of the PNG release (`NLMCXR_png`, files `<parentImage id>.png`). One study per report XML: `study_id` and
`patient_id` = the report's `uId` (e.g. "CXR1"; Open-i has one report per patient), images = its
`<parentImage id>` elements in order, `report` = the `AbstractText` FINDINGS then IMPRESSION (whitespace
collapsed; the "XXXX" de-identification marks are kept). Reports without images are dropped (counted);
studies with fewer than `min_report_tokens` tokens are dropped (counted).

Views: `View Position` of `nlmcxr_dicom_metadata.csv.gz` (found next to the reports by default, or
`dicom_metadata_path`), matched on the image id (a few ids carry an extra `_<n>_` after the report
number, e.g. `CXR1_1_IM-0001-3001` vs `CXR1_IM-0001-3001`); "UNKNOWN" when blank or absent.

Split: no official split exists; seeded 70/10/20 by patient (`split_seed`).
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from datasets import DatasetDict

from .common import (
    InvalidDataError,
    InvalidEntries,
    UNKNOWN_VIEW,
    build_dataset_dict,
    check_images,
    count_tokens,
    normalize_view,
    read_table,
    seeded_patient_split,
    study_features,
)

logger = logging.getLogger(__name__)

DICOM_METADATA_FILE = "nlmcxr_dicom_metadata.csv.gz"
IMAGE_EXTENSIONS = (".png", ".jpg")


def iter_report_xmls(reports_path_or_dir: Path) -> Iterator[tuple[str, bytes]]:
    """`(name, xml bytes)` for every `.xml` in a .tgz/.tar archive or under a folder, sorted by name."""
    if reports_path_or_dir.is_dir():
        for path in sorted(reports_path_or_dir.rglob("*.xml")):
            yield str(path), path.read_bytes()
        return
    if not reports_path_or_dir.is_file():
        raise FileNotFoundError(f"{reports_path_or_dir}: reports archive or folder not found")
    try:
        with tarfile.open(reports_path_or_dir) as archive:
            members = sorted((m for m in archive.getmembers() if m.isfile() and m.name.endswith(".xml")),
                             key=lambda m: m.name)
            for member in members:
                yield f"{reports_path_or_dir}!{member.name}", archive.extractfile(member).read()
    except tarfile.TarError as err:
        raise InvalidDataError(f"{reports_path_or_dir}: not a readable tar archive ({err})") from err


def parse_report_xml(content: bytes, where: str) -> dict:
    """`{"study_id", "findings", "impression", "image_ids", "mesh_major"}` of one Open-i report XML (`mesh_major`:
    the `<MeSH><major>` terms, e.g. "normal", "Opacity/lung/base/left/mild")."""
    try:
        root = ET.fromstring(content)
    except ET.ParseError as err:
        raise InvalidDataError(f"{where}: malformed XML ({err})") from err
    uid = root.find("uId")
    study_id = uid.get("id") if uid is not None else None
    if not study_id:
        raise InvalidDataError(f"{where}: no <uId id=...> element")
    sections: dict[str, list[str]] = {"FINDINGS": [], "IMPRESSION": []}
    for element in root.iter("AbstractText"):
        label = (element.get("Label") or "").strip().upper()
        text = " ".join("".join(element.itertext()).split())
        if label in sections and text:
            sections[label].append(text)
    image_ids = [p.get("id") for p in root.findall("parentImage") if p.get("id")]
    mesh_major = [" ".join("".join(m.itertext()).split()) for m in root.iter("major")]
    return {"study_id": study_id, "findings": " ".join(sections["FINDINGS"]),
            "impression": " ".join(sections["IMPRESSION"]), "image_ids": image_ids, "mesh_major": mesh_major}


def _view_lookup(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    table = read_table(path, ("imageid", "View Position"))
    return dict(zip(table["imageid"].str.strip(), table["View Position"]))


def load_iu_xray(
    reports_path_or_dir: str | os.PathLike,
    image_dir: str | os.PathLike,
    dicom_metadata_path: str | os.PathLike | None = None,
    min_report_tokens: int = 3,
    split_seed: int = 0,
    skip_invalid: bool = False,
    verify_images: bool = True,
) -> DatasetDict:
    """IU X-ray studies as a DatasetDict (train/validation/test) of `study_id`, `patient_id`, `images`,
    `view_positions`, `report`. See the module docstring."""
    reports_path_or_dir, image_dir = Path(reports_path_or_dir).absolute(), Path(image_dir).absolute()
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: image folder not found")
    if dicom_metadata_path is None:
        candidate = (reports_path_or_dir if reports_path_or_dir.is_dir() else reports_path_or_dir.parent) / DICOM_METADATA_FILE
        dicom_metadata_path = candidate if candidate.is_file() else None
    views = _view_lookup(Path(dicom_metadata_path) if dicom_metadata_path is not None else None)
    invalid = InvalidEntries("iu_xray", skip_invalid)

    studies, entries, n_no_image_listed = [], [], 0
    for where, content in iter_report_xmls(reports_path_or_dir):
        try:
            report = parse_report_xml(content, where)
        except InvalidDataError as err:
            invalid("malformed report", str(err))
            continue
        if not report["image_ids"]:
            n_no_image_listed += 1
            continue
        images = []
        for image_id in report["image_ids"]:
            path = next((image_dir / f"{image_id}{e}" for e in IMAGE_EXTENSIONS if (image_dir / f"{image_id}{e}").is_file()),
                        image_dir / f"{image_id}.png")
            view = views.get(image_id, views.get(re.sub(r"^(CXR\d+)_\d+_", r"\1_", image_id)))
            images.append((path, normalize_view(view) if view is not None else UNKNOWN_VIEW))
            entries.append((path, f"{where} (parentImage {image_id})"))
        studies.append((report, images))
    ok = check_images(entries, invalid, verify_images, desc="Checking IU X-ray images")

    rows, offset, n_short, n_no_image = [], 0, 0, 0
    for report, images in studies:
        flags = ok[offset : offset + len(images)]
        offset += len(images)
        images = [(str(p), v) for (p, v), good in zip(images, flags) if good]
        if not images:
            n_no_image += 1
            continue
        text = " ".join(t for t in (report["findings"], report["impression"]) if t)
        if count_tokens(text) < min_report_tokens:
            n_short += 1
            continue
        rows.append({"study_id": report["study_id"], "patient_id": report["study_id"], "images": [p for p, _ in images],
                     "view_positions": [v for _, v in images], "report": text})
    invalid.log_summary()
    logger.info(
        "iu_xray: %d studies kept; dropped: %d reports without images, %d with no valid image file, "
        "%d with fewer than %d report tokens",
        len(rows), n_no_image_listed, n_no_image, n_short, min_report_tokens,
    )
    split_of = seeded_patient_split([r["patient_id"] for r in rows], split_seed)
    dataset = build_dataset_dict(rows, [split_of[r["patient_id"]] for r in rows], study_features())
    logger.info("iu_xray: %s", {k: len(v) for k, v in dataset.items()})
    return dataset
