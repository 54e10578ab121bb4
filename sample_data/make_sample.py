"""Regenerates the embedded sample (this folder) from the shared real data, deterministically.

    python sample_data/make_sample.py [--shared-data ../shared/data] [--out sample_data]

Selection (see README.md here):
- covid19_collection: every row of each patient (X-ray rows only, licence checked again) who has at least
  one study (same patientid, date and offset) with two or more images and clinical notes of at least
  three words; images copied unchanged; metadata.csv keeps all columns, in the original order.
- nih_chestxray14_sample: every image of the first 70 patients (by Patient ID) with an image in the
  1,000-image subset's train_val_list.txt and of the first 25 with an image in its test_list.txt, with
  their Data_Entry_2017.csv rows and lines of train_val_list.txt / test_list.txt.
- kermany_pneumonia: a seeded, patient-level draw from each official folder (train/, test/) and finding (normal,
  bacteria, virus): patients in a seeded random order, each taken with all its images of that folder, until the
  finding's quota (KERMANY_QUOTA) is reached; images converted to 8-bit grayscale, resized to 64 x 64 (LANCZOS) and
  saved as JPEG quality 90 under the released file name, in the released layout.
- iu_xray: the first 800 Open-i report XMLs of NLMCXR_reports.tgz (archive order), bytes and tar headers
  unchanged (the original tar stream up to the 601st report, then the end marker), in a new NLMCXR_reports.tgz; the nlmcxr_dicom_metadata.csv.gz rows of the images they name.
- splits/: the lines of the REFERS split lists that name a selected image, unchanged; the Shenzhen lists
  complete (no Shenzhen images here); the first 10 lines of each VinBigData list (no VinBigData images here).
- ATTRIBUTION.md: the licence, DOI and URL of every COVID-19 collection image; the Open-i source.
Only the standard library is used, and Pillow for the Kermany images (their JPEG bytes depend on its libjpeg build,
as the .gz bytes depend on zlib's). Output is built in a temporary folder, then moved into place.
The two .gz files are written with a zero timestamp and no file name, so the bytes depend only on the
input and on the zlib build (the sample test compares them after decompression).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import os
import random
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
NIH_TRAIN_VAL_PATIENTS = 70
NIH_TEST_PATIENTS = 25
MIN_NOTE_WORDS = 3
OPEN_I_REPORTS = 800  # >= 40 reports of each paired finding (normal: 279, pneumonia: 47; kermany_paired_reports)
VINBIGDATA_LINES = 10
REDISTRIBUTABLE = ("CC BY", "CC BY 2.0", "CC BY 3.0", "CC BY 4.0", "CC BY-SA", "CC BY-SA 4.0", "CC BY-NC-SA",
                   "CC BY-NC-SA 4.0")
KERMANY_SEED = 0
KERMANY_SIZE = 64
KERMANY_QUALITY = 90
# (official folder, finding) -> images: normal vs pneumonia balanced, pneumonia half bacterial, half viral
KERMANY_QUOTA = {("train", "normal"): 200, ("train", "bacteria"): 100, ("train", "virus"): 100,
                 ("test", "normal"): 75, ("test", "bacteria"): 38, ("test", "virus"): 37}
KERMANY_NORMAL = re.compile(r"^(?P<patient>(?:NORMAL2-)?IM-\d{4})-\d{4}(?:-\d{4})?\.jpe?g$", re.IGNORECASE)
KERMANY_PNEUMONIA = re.compile(r"^(?P<person>person\d+)_(?P<finding>bacteria|virus)_\d+(?:_\d+)?\.jpe?g$",
                               re.IGNORECASE)
MANAGED = ("covid19_collection", "nih_chestxray14_sample", "kermany_pneumonia", "iu_xray", "splits",
           "ATTRIBUTION.md")


def default_shared_data() -> Path:
    env = os.environ.get("REFERS_SHARED_DATA")
    return Path(env) if env else HERE.parent.parent / "shared" / "data"


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        return header, list(reader)


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _filter_list(source: Path, target: Path, names: set[str]) -> int:
    lines = [ln for ln in source.read_text(encoding="utf-8").splitlines(keepends=True)
             if ln.split() and ln.split()[0].rsplit("/", 1)[-1] in names]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(lines), encoding="utf-8")
    return len(lines)


def select_covid(shared: Path, out: Path) -> list[dict[str, str]]:
    header, rows = _read_csv(shared / "covid19_collection" / "metadata.csv")
    col = {name: i for i, name in enumerate(header)}
    rows = [r for r in rows if r[col["modality"]] == "X-ray"]
    studies: dict[tuple[str, str, str], list[list[str]]] = {}
    for r in rows:
        studies.setdefault((r[col["patientid"]], r[col["date"]], r[col["offset"]]), []).append(r)
    patients = {key[0] for key, group in studies.items()
                if len(group) >= 2 and any(len(r[col["clinical_notes"]].split()) >= MIN_NOTE_WORDS for r in group)}
    chosen = [r for r in rows if r[col["patientid"]] in patients]
    bad = sorted({r[col["license"]] for r in chosen} - set(REDISTRIBUTABLE))
    if bad:
        raise SystemExit(f"licences not known to allow redistribution: {bad}")
    (out / "covid19_collection" / "images").mkdir(parents=True)
    for r in chosen:
        target = out / "covid19_collection" / r[col["folder"]] / r[col["filename"]]
        if not target.exists():
            shutil.copyfile(shared / "covid19_collection" / r[col["folder"]] / r[col["filename"]], target)
    _write_csv(out / "covid19_collection" / "metadata.csv", header, chosen)
    originals = {r[col["original_filename"]] for r in chosen}
    for name in ("train", "val", "test"):
        _filter_list(shared / "splits" / "covid19_collection" / f"{name}.txt",
                     out / "splits" / "covid19_collection" / f"{name}.txt", originals)
    return [{k: r[col[k]] for k in ("filename", "patientid", "license", "doi", "url")} for r in chosen]


def select_nih(shared: Path, out: Path) -> None:
    source = shared / "nih_chestxray14_sample"
    header, rows = _read_csv(source / "Data_Entry_2017.csv")
    col = {name: i for i, name in enumerate(header)}
    test_names = set((source / "test_list.txt").read_text(encoding="utf-8").split())
    in_test = sorted({int(r[col["Patient ID"]]) for r in rows if r[col["Image Index"]] in test_names})
    in_train_val = sorted({int(r[col["Patient ID"]]) for r in rows if r[col["Image Index"]] not in test_names})
    patients = set(in_train_val[:NIH_TRAIN_VAL_PATIENTS]) | set(in_test[:NIH_TEST_PATIENTS])
    chosen = [r for r in rows if int(r[col["Patient ID"]]) in patients]
    names = {r[col["Image Index"]] for r in chosen}
    (out / "nih_chestxray14_sample" / "images").mkdir(parents=True)
    for name in sorted(names):
        shutil.copyfile(source / "images" / name, out / "nih_chestxray14_sample" / "images" / name)
    _write_csv(out / "nih_chestxray14_sample" / "Data_Entry_2017.csv", header, chosen)
    for name in ("train_val_list.txt", "test_list.txt"):
        _filter_list(source / name, out / "nih_chestxray14_sample" / name, names)
    write_nih_boxes(source, out, names)
    for name in ("val", "test"):
        _filter_list(shared / "splits" / "nih_chestxray14" / f"{name}.txt",
                     out / "splits" / "nih_chestxray14" / f"{name}.txt", names)


def write_nih_boxes(source: Path, out: Path, names: set[str]) -> None:
    """The rows of NIH's official BBox_List_2017.csv (1024-px coordinates) for the sample's images."""
    header, rows = _read_csv(source / "BBox_List_2017.csv")
    _write_csv(out / "nih_chestxray14_sample" / "BBox_List_2017.csv", header, [r for r in rows if r[0] in names])


def _kermany_patient(name: str, class_folder: str) -> tuple[str, str]:
    """(patient id, finding) as datasets_scripts.kermany_pneumonia.parse_kermany_name gives them (series-qualified
    ids: the official split is patient-disjoint on those)."""
    if class_folder == "NORMAL":
        match = KERMANY_NORMAL.match(name)
        if match:
            return match.group("patient"), "normal"
    else:
        match = KERMANY_PNEUMONIA.match(name)
        if match:
            finding = match.group("finding").lower()
            return f"{match.group('person')}_{finding}", finding
    raise SystemExit(f"kermany_pneumonia/{class_folder}/{name}: unexpected file name")


def select_kermany(shared: Path, out: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """Per official folder and finding, patients in a seeded random order (of the sorted ids), each with all its
    images of that folder, until KERMANY_QUOTA images; images 8-bit grayscale, 64 x 64 (LANCZOS), JPEG quality 90,
    same file names. Returns {(folder, finding): (patients, images)}."""
    from PIL import Image

    source = shared / "kermany_pneumonia"
    counts = {}
    for split in ("train", "test"):
        patients: dict[tuple[str, str], dict[str, list[Path]]] = {}
        for class_folder in ("NORMAL", "PNEUMONIA"):
            for path in sorted((source / split / class_folder).iterdir()):
                if path.name.startswith(".") or path.suffix.lower() not in (".jpeg", ".jpg"):
                    continue
                patient, finding = _kermany_patient(path.name, class_folder)
                patients.setdefault((split, finding), {}).setdefault(patient, []).append(path)
        for finding in ("normal", "bacteria", "virus"):
            pool = patients[(split, finding)]
            order = sorted(pool)
            random.Random(f"{KERMANY_SEED}-{split}-{finding}").shuffle(order)
            chosen: list[Path] = []
            taken = 0
            for patient in order:
                if len(chosen) >= KERMANY_QUOTA[(split, finding)]:
                    break
                chosen += pool[patient]
                taken += 1
            for path in chosen:
                target = out / "kermany_pneumonia" / split / path.parent.name / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                with Image.open(path) as image:
                    small = image.convert("L").resize((KERMANY_SIZE, KERMANY_SIZE), Image.LANCZOS)
                small.save(target, "JPEG", quality=KERMANY_QUALITY)
            counts[(split, finding)] = (taken, len(chosen))
    return counts


def _gzip_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        gz.write(data)


def select_iu_xray(shared: Path, out: Path) -> None:
    """The first OPEN_I_REPORTS report XMLs (and the folder entry before them), and the DICOM metadata rows
    (in their order) of the images those reports name (parentImage ids). The tar stream is the original's
    first bytes, up to the header of the next report, then the end-of-archive marker (two zero blocks):
    every header and file byte is unchanged."""
    source = shared / "iu_xray"
    (out / "iu_xray").mkdir(parents=True)
    with gzip.open(source / "NLMCXR_reports.tgz", "rb") as handle:
        stream = handle.read()
    image_ids: set[str] = set()
    reports, cut = 0, None
    with tarfile.open(fileobj=io.BytesIO(stream), mode="r:") as archive:
        for member in archive:
            if not (member.isfile() and member.name.endswith(".xml")):
                continue
            if reports == OPEN_I_REPORTS:
                cut = member.offset
                break
            reports += 1
            for image_id in re.findall(r'<parentImage id="([^"]+)"', archive.extractfile(member).read().decode("utf-8")):
                # the table names some images without the report's extra "_<n>_" (CXR1_1_IM-... vs
                # CXR1_IM-...); datasets_scripts.iu_xray matches both, so keep both
                image_ids.update({image_id, re.sub(r"^(CXR\d+)_\d+_", r"\1_", image_id)})
    if cut is None:
        raise SystemExit(f"{source / 'NLMCXR_reports.tgz'}: fewer than {OPEN_I_REPORTS + 1} reports")
    _gzip_bytes(out / "iu_xray" / "NLMCXR_reports.tgz", stream[:cut] + bytes(2 * tarfile.BLOCKSIZE))
    with gzip.open(source / "nlmcxr_dicom_metadata.csv.gz", "rt", encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = [r for r in reader if r[header.index("imageid")] in image_ids]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    _gzip_bytes(out / "iu_xray" / "nlmcxr_dicom_metadata.csv.gz", text.getvalue().encode("utf-8"))


def copy_other_split_lists(shared: Path, out: Path) -> None:
    """Split lists of the data sets without images here: Shenzhen complete, VinBigData's first lines."""
    (out / "splits" / "shenzhen_tb").mkdir(parents=True)
    for name in ("train", "valid", "test"):
        shutil.copyfile(shared / "splits" / "shenzhen_tb" / f"{name}.txt", out / "splits" / "shenzhen_tb" / f"{name}.txt")
    (out / "splits" / "vinbigdata").mkdir(parents=True)
    for name in ("train", "val", "test"):
        with open(shared / "splits" / "vinbigdata" / f"{name}.txt", encoding="utf-8", newline="") as handle:
            lines = [next(handle) for _ in range(VINBIGDATA_LINES)]
        (out / "splits" / "vinbigdata" / f"{name}.txt").write_text("".join(lines), encoding="utf-8", newline="")


def write_attribution(out: Path, covid_rows: list[dict[str, str]]) -> None:
    lines = [
        "# Attribution of the sample images",
        "",
        "## COVID-19 image data collection (`covid19_collection/`)",
        "",
        "Cohen JP, Morrison P, Dao L. COVID-19 image data collection. arXiv:2003.11597, 2020",
        "(https://github.com/ieee8023/covid-chestxray-dataset, snapshot of 2020-06-22). Each image keeps the",
        "licence of its source publication, listed below with the source's DOI/URL (also in the `license`,",
        "`doi` and `url` columns of `metadata.csv`). Images were converted to 8-bit grayscale JPEGs with the",
        "shorter side resized to 256 px (see README.md). Not for diagnostic use.",
        "",
        "| image | patient | licence | DOI | URL |",
        "|---|---|---|---|---|",
    ]
    for r in covid_rows:
        lines.append(f"| {r['filename']} | {r['patientid']} | {r['license']} | {r['doi'] or '-'} | {r['url'] or '-'} |")
    lines += [
        "",
        "## NIH ChestX-ray14 (`nih_chestxray14_sample/`)",
        "",
        "Images from the NIH Clinical Center ChestX-ray14 release (no restrictions on use), downsampled to",
        "64x64. Please cite: Wang X, Peng Y, Lu L, Lu Z, Bagheri M, Summers RM. ChestX-ray8: Hospital-scale",
        "Chest X-ray Database and Benchmarks on Weakly-Supervised Classification and Localization of Common",
        "Thorax Diseases. CVPR 2017. We acknowledge the NIH Clinical Center for providing the data.",
        "",
        "## Kermany pediatric pneumonia (`kermany_pneumonia/`)",
        "",
        "Kermany DS, Goldbaum M, Cai W, et al. Identifying Medical Diagnoses and Treatable Diseases by Image-Based",
        "Deep Learning. Cell 172(5):1122-1131, 2018. Data: Kermany D, Zhang K, Goldbaum M. Labeled Optical Coherence",
        "Tomography (OCT) and Chest X-Ray Images for Classification. Mendeley Data v2, 2018, doi:10.17632/rscbjbr9sj.2",
        "(the ChestXRay2017 part; Guangzhou Women and Children's Medical Center). Licence: CC BY 4.0",
        "(https://creativecommons.org/licenses/by/4.0/). The images here are adaptations: taken from a copy already",
        f"resized to 224 x 224, converted to 8-bit grayscale, resized to {KERMANY_SIZE} x {KERMANY_SIZE} (LANCZOS) and saved as",
        f"JPEG quality {KERMANY_QUALITY}, under the released file names (see README.md). Not for diagnostic use.",
        "",
        "## Open-i Indiana University chest X-ray reports (`iu_xray/`)",
        "",
        "Demner-Fushman D, Kohli MD, Rosenman MB, Shooshan SE, Rodriguez L, Antani S, Thoma GR, McDonald CJ.",
        "Preparing a collection of radiology examinations for distribution and retrieval. J Am Med Inform",
        "Assoc 23(2):304-310, 2016. Source: National Library of Medicine, Open-i (https://openi.nlm.nih.gov/),",
        f"`NLMCXR_reports.tgz`: the first {OPEN_I_REPORTS} report XMLs (archive order), unchanged (report texts byte for",
        "byte as published), and the rows of the DICOM metadata table for the images they name. Licence:",
        "CC BY-NC-ND 4.0 (https://creativecommons.org/licenses/by-nc-nd/4.0/): NonCommercial use only, no derivatives.",
        "The quickstart pairs some of these reports, unchanged, with Kermany radiographs of the same finding",
        "(`kermany_paired_reports`); the pairing is ours, the reports are not modified.",
        "",
        "## Split lists (`splits/`)",
        "",
        "Lines of the split lists published with REFERS (Zhou HY et al., Generalized radiograph representation",
        "learning via cross-supervision between images and free-text radiology reports, Nature Machine",
        "Intelligence 4, 32-40, 2022; https://github.com/funnyzhou/REFERS), unchanged: for the images above",
        f"(`covid19_collection/`, `nih_chestxray14/`), complete (`shenzhen_tb/`), and the first {VINBIGDATA_LINES} lines",
        "of each list (`vinbigdata/`).",
        "",
    ]
    (out / "ATTRIBUTION.md").write_text("\n".join(lines), encoding="utf-8")


def make_sample(shared: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".make_sample-", dir=out) as tmp:
        build = Path(tmp)
        covid_rows = select_covid(shared, build)
        select_nih(shared, build)
        select_kermany(shared, build)
        select_iu_xray(shared, build)
        copy_other_split_lists(shared, build)
        write_attribution(build, covid_rows)
        for name in MANAGED:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(build / name, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared-data", type=Path, default=default_shared_data(), help="the shared real data folder")
    parser.add_argument("--out", type=Path, default=HERE, help="where to write the sample (default: this folder)")
    args = parser.parse_args()
    if not (args.shared_data / "README.md").is_file():
        raise SystemExit(f"{args.shared_data}: shared data not found (set --shared-data or REFERS_SHARED_DATA)")
    make_sample(args.shared_data, args.out)


if __name__ == "__main__":
    main()
