"""Source-domain builders: MIMIC-CXR-JPG layout (made-up CSV rows, reports composed from real Open-i
texts, real JPEGs), IU X-ray (real XMLs, image folder built with the XML's names), generic study folders."""

import csv
import gzip
import html
import io
import json
import re
import shutil
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

import datasets
from datasets_scripts import InvalidDataError, load_iu_xray, load_mimic_cxr, load_study_folder

_SECTION = re.compile(r'<AbstractText Label="(?P<label>[A-Z]+)"(?:/>|>(?P<text>.*?)</AbstractText>)', re.S)
_IMAGE = re.compile(r'<parentImage id="([^"]+)"')


def _norm(text):
    return " ".join(text.split())


@pytest.fixture(scope="module")
def open_i(shared_data_dir):
    """{xml name: (raw xml bytes, {section: text}, [image ids])} for a few real reports (regex-parsed)."""
    wanted = {f"{n}.xml" for n in (1, 10, 1000, 1002, 1068, 1084, 1137)}
    out = {}
    with tarfile.open(shared_data_dir / "iu_xray" / "NLMCXR_reports.tgz") as archive:
        for member in archive.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if name in wanted:
                raw = archive.extractfile(member).read()
                text = raw.decode("utf-8")
                sections = {m["label"]: _norm(html.unescape(m["text"] or "")) for m in _SECTION.finditer(text)}
                out[name] = (raw, sections, _IMAGE.findall(text))
    assert len(out) == len(wanted)
    return out


def _jpegs(shared_data_dir, n):
    return sorted((shared_data_dir / "covid19_collection" / "images").glob("*.jpg"))[:n]


# --------------------------------------------------------------------------------------------- MIMIC-CXR
def _mimic_text(sections, findings=True, impression=True, free_paragraph=None):
    lines = ["                                 FINAL REPORT", " EXAMINATION:  CHEST (PA AND LAT)", " ",
             f" INDICATION:  {sections.get('INDICATION') or '___'}", " ", f" COMPARISON:  {sections.get('COMPARISON') or 'None.'}", " "]
    for wanted, key in ((findings, "FINDINGS"), (impression, "IMPRESSION")):
        if wanted and sections.get(key):
            lines += [f" {key}:", " "] + [f" {b}" for b in textwrap.wrap(sections[key], 75, break_on_hyphens=False)] + [" "]
    if free_paragraph:
        lines += [f" {b}" for b in textwrap.wrap(free_paragraph, 75, break_on_hyphens=False)] + [" "]
    return "\n".join(lines) + "\n"


def _write_gz_csv(path, header, rows):
    with gzip.open(path, "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def mimic(shared_data_dir, open_i, tmp_path):
    sec = {k: v[1] for k, v in open_i.items()}
    # (subject, study, split, [(dicom_id, ViewPosition)], report text, expected report or None = dropped)
    studies = [
        ("10000032", "50414267", "train", [("d01", "PA"), ("d02", "LATERAL")], _mimic_text(sec["1.xml"]),
         f"{sec['1.xml']['FINDINGS']} {sec['1.xml']['IMPRESSION']}"),
        ("10000032", "53189527", "train", [("d03", "AP")], _mimic_text(sec["1002.xml"]), sec["1002.xml"]["IMPRESSION"]),
        ("10000764", "57375967", "validate", [("d04", "PA"), ("d05", "LL")],
         _mimic_text(sec["1137.xml"], free_paragraph=sec["1084.xml"]["FINDINGS"]), sec["1084.xml"]["FINDINGS"]),
        ("10000764", "50000001", "validate", [("d06", "AP")], _mimic_text(sec["1137.xml"]), None),
        ("10000898", "51111111", "test", [("d07", "PA"), ("d08", "LL"), ("d09", "")], _mimic_text(sec["10.xml"]),
         f"{sec['10.xml']['FINDINGS']} {sec['10.xml']['IMPRESSION']}"),
    ]
    root = tmp_path / "mimic-cxr-jpg"
    jpegs = iter(_jpegs(shared_data_dir, 9))
    split_rows, meta_rows = [], []
    reports = tmp_path / "mimic-cxr-reports"
    for subject, study, split, images, text, _ in studies:
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True)
        for dicom_id, view in images:
            shutil.copy(next(jpegs), folder / f"{dicom_id}.jpg")
            split_rows.append([dicom_id, study, subject, split])
            meta_rows.append([dicom_id, subject, study, "CHEST (PA AND LAT)", view, 3056, 2544])
        report = reports / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(text)
    _write_gz_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    _write_gz_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz",
                  ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                   "Columns"], meta_rows)
    with zipfile.ZipFile(root / "mimic-cxr-reports.zip", "w") as archive:
        for path in sorted(reports.rglob("*.txt")):
            archive.write(path, "mimic-cxr-reports/" + str(path.relative_to(reports)))
    return {"root": root, "studies": studies, "reports_dir": reports, "split_rows": split_rows}


def _check_mimic(ds, studies):
    expected = {s[1]: s for s in studies if s[5] is not None}
    assert {k: len(v) for k, v in ds.items()} == {"train": 2, "validation": 1, "test": 1}
    for split, d in ds.items():
        d = d.cast_column("images", datasets.List(datasets.Image(decode=False)))
        for row in d:
            subject, study, listed_split, images, _, report = expected[row["study_id"]]
            assert split == {"validate": "validation"}.get(listed_split, listed_split)
            assert row["patient_id"] == subject
            assert [im["path"].rsplit("/", 1)[-1] for im in row["images"]] == [f"{d_}.jpg" for d_, _ in images]
            assert row["view_positions"] == [v or "UNKNOWN" for _, v in images]
            assert row["report"] == report


def test_mimic_from_zip_and_folder(mimic, caplog):
    caplog.set_level("INFO")
    ds = load_mimic_cxr(mimic["root"])  # finds mimic-cxr-reports.zip
    _check_mimic(ds, mimic["studies"])
    assert "1 dropped with fewer than 3 report tokens" in caplog.text
    assert ds["train"].features == datasets.Features(
        {"study_id": datasets.Value("string"), "patient_id": datasets.Value("string"),
         "images": datasets.List(datasets.Image()), "view_positions": datasets.List(datasets.Value("string")),
         "report": datasets.Value("string")})
    assert ds["test"][0]["images"][0].format == "JPEG"
    (mimic["root"] / "mimic-cxr-reports.zip").unlink()
    _check_mimic(load_mimic_cxr(mimic["root"], reports_path=mimic["reports_dir"]), mimic["studies"])
    with pytest.raises(FileNotFoundError, match="no MIMIC-CXR reports"):
        load_mimic_cxr(mimic["root"])


def test_mimic_bad_inputs(mimic, caplog):
    root = mimic["root"]
    report = mimic["reports_dir"] / "files/p10/p10000898/s51111111.txt"
    report.unlink()
    with pytest.raises(InvalidDataError, match=r"split\.csv\.gz, row 7: report .*s51111111\.txt of study 51111111 not found"):
        load_mimic_cxr(root, reports_path=mimic["reports_dir"])
    ds = load_mimic_cxr(root, reports_path=mimic["reports_dir"], skip_invalid=True)
    assert len(ds["test"]) == 0 and "1 missing report" in caplog.text

    image = root / "files/p10/p10000032/s50414267/d02.jpg"
    good = image.read_bytes()
    image.unlink()
    with pytest.raises(InvalidDataError, match=r"split\.csv\.gz, row 2 \(dicom d02\): image .*d02\.jpg not found"):
        load_mimic_cxr(root)
    image.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(InvalidDataError, match=r"row 2 \(dicom d02\): image file .*d02\.jpg is corrupt"):
        load_mimic_cxr(root)
    image.write_bytes(good)

    rows = [r[:3] for r in mimic["split_rows"]]
    _write_gz_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id"], rows)
    with pytest.raises(InvalidDataError, match=r"mimic-cxr-2\.0\.0-split\.csv\.gz: missing column\(s\) \['split'\]"):
        load_mimic_cxr(root)


# --------------------------------------------------------------------------------------------- IU X-ray
@pytest.fixture
def iu(shared_data_dir, open_i, tmp_path):
    xml_dir = tmp_path / "ecgen-radiology"
    xml_dir.mkdir()
    image_dir = tmp_path / "NLMCXR_png"
    image_dir.mkdir()
    pngs = iter(sorted((shared_data_dir / "nih_chestxray14_sample" / "images").glob("*.png")))
    for name, (raw, _, image_ids) in open_i.items():
        (xml_dir / name).write_bytes(raw)
        for image_id in image_ids:
            shutil.copy(next(pngs), image_dir / f"{image_id}.png")
    views = {}
    with gzip.open(shared_data_dir / "iu_xray" / "nlmcxr_dicom_metadata.csv.gz", "rt", newline="") as handle:
        for row in csv.DictReader(handle):
            views[row["imageid"]] = row["View Position"]
    return {"xml_dir": xml_dir, "image_dir": image_dir, "views": views,
            "metadata": shared_data_dir / "iu_xray" / "nlmcxr_dicom_metadata.csv.gz"}


def test_iu_xray_studies(iu, open_i, caplog):
    caplog.set_level("INFO")
    ds = load_iu_xray(iu["xml_dir"], iu["image_dir"], dicom_metadata_path=iu["metadata"])
    rows = {r["study_id"]: r for s in ds for r in ds[s].cast_column("images", datasets.List(datasets.Image(decode=False)))}
    # 1068 has no images, 1137 has neither findings nor impression: both dropped
    assert sorted(rows) == ["CXR1", "CXR10", "CXR1000", "CXR1002", "CXR1084"]
    assert "dropped: 1 reports without images, 0 with no valid image file, 1 with fewer than 3 report tokens" in caplog.text
    for name in ("1.xml", "10.xml", "1000.xml", "1002.xml", "1084.xml"):
        _, sections, image_ids = open_i[name]
        row = rows[f"CXR{name[:-4]}"]
        assert row["report"] == " ".join(t for t in (sections["FINDINGS"], sections["IMPRESSION"]) if t)
        assert [im["path"].rsplit("/", 1)[-1] for im in row["images"]] == [f"{i}.png" for i in image_ids]
        assert row["patient_id"] == row["study_id"]
    assert rows["CXR10"]["view_positions"] == ["PA", "AP"]
    assert rows["CXR1000"]["view_positions"] == ["UNKNOWN", "PA", "PA"]  # -1001 is absent from the metadata
    assert rows["CXR1"]["view_positions"] == [iu["views"]["CXR1_IM-0001-3001"], iu["views"]["CXR1_IM-0001-4001"]]
    assert {k: len(v) for k, v in ds.items()} == {"train": 4, "validation": 0, "test": 1}  # cuts at 3.5 -> 4, 4.0


def test_iu_xray_from_archive_with_partial_image_folder(iu, shared_data_dir, caplog):
    ds = load_iu_xray(shared_data_dir / "iu_xray" / "NLMCXR_reports.tgz", iu["image_dir"], skip_invalid=True)
    assert sorted(r for s in ds for r in ds[s]["study_id"]) == ["CXR1", "CXR10", "CXR1000", "CXR1002", "CXR1084"]
    n_created = len(list(iu["image_dir"].iterdir()))
    n_images = _image_references(shared_data_dir / "iu_xray" / "NLMCXR_reports.tgz")  # 7,470 (README); sample: 1,515
    assert f"skipped {n_images - n_created} invalid entries ({n_images - n_created} missing image)" in caplog.text


def _image_references(archive_path):
    """parentImage elements over all XMLs of a report archive (regex count, not the loader's parser)."""
    with tarfile.open(archive_path) as archive:
        return sum(len(_IMAGE.findall(archive.extractfile(m).read().decode("utf-8")))
                   for m in archive if m.isfile() and m.name.endswith(".xml"))


def test_iu_xray_bad_inputs(iu):
    (iu["image_dir"] / "CXR1000_IM-0003-2001.png").unlink()
    with pytest.raises(InvalidDataError, match=r"1000\.xml \(parentImage CXR1000_IM-0003-2001\): image .* not found"):
        load_iu_xray(iu["xml_dir"], iu["image_dir"])
    ds = load_iu_xray(iu["xml_dir"], iu["image_dir"], skip_invalid=True)
    (row,) = [r for s in ds for r in ds[s] if r["study_id"] == "CXR1000"]
    assert len(row["images"]) == 2
    (iu["image_dir"] / "CXR10_IM-0002-1001.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(InvalidDataError, match=r"10\.xml \(parentImage CXR10_IM-0002-1001\): image file .* is corrupt"):
        load_iu_xray(iu["xml_dir"], iu["image_dir"], skip_invalid=False)
    (iu["xml_dir"] / "9999.xml").write_text("<eCitation><uId id='CXR9999'/>")
    with pytest.raises(InvalidDataError, match=r"9999\.xml: malformed XML"):
        load_iu_xray(iu["xml_dir"], iu["image_dir"])


# ---------------------------------------------------------------------------------------- study folder
@pytest.fixture
def folder(shared_data_dir, tmp_path):
    root = tmp_path / "studies"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    jpegs = _jpegs(shared_data_dir, 3)
    nih = shared_data_dir / "nih_chestxray14_sample" / "images"
    shutil.copy(jpegs[0], root / "a" / "pa.jpg")
    shutil.copy(jpegs[1], root / "a" / "lat.jpg")
    shutil.copy(nih / "00000001_000.png", root / "b" / "frontal.png")
    shutil.copy(jpegs[2], root / "c.jpg")
    lines = [
        {"file_names": ["a/pa.jpg", "a/lat.jpg"], "report": "Heart size normal.\n Lungs clear.", "views": ["PA", "L"],
         "split": "train", "study_id": "A", "patient_id": "P1"},
        {"file_names": ["b/frontal.png"], "report": "Small left effusion noted.", "split": "val", "study_id": "B"},
        {"file_names": ["c.jpg"], "report": "Normal.", "split": "test", "study_id": "C"},
        {"file_names": ["c.jpg"], "report": "No acute cardiopulmonary process.", "split": "test", "study_id": "D"},
    ]
    return root, lines


# a real radiograph outside the study folder, by absolute path (exists: only the path form is wrong)
_NIH_FRONTAL = (Path(__file__).resolve().parents[1] / "sample_data" / "nih_chestxray14_sample" / "images"
                / "00000001_000.png")


def _write_jsonl(root, lines):
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_study_folder(folder, caplog):
    caplog.set_level("INFO")
    root, lines = folder
    _write_jsonl(root, lines)
    ds = load_study_folder(root)
    assert {k: list(v["study_id"]) for k, v in ds.items()} == {"train": ["A"], "validation": ["B"], "test": ["D"]}
    assert "1 dropped with fewer than 3 report tokens" in caplog.text
    a = ds["train"][0]
    assert a["report"] == "Heart size normal. Lungs clear."
    assert a["view_positions"] == ["PA", "L"] and a["patient_id"] == "P1" and len(a["images"]) == 2
    assert ds["validation"][0]["view_positions"] == ["UNKNOWN"] and ds["validation"][0]["patient_id"] == "B"
    _write_jsonl(root, [{k: v for k, v in line.items() if k != "split"} for line in lines])
    ds = load_study_folder(root, split_seed=0)
    assert sum(len(d) for d in ds.values()) == 3


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda ls: ls[1].pop("report"), r"line 2: missing field 'report'"),
        (lambda ls: ls[0].update(views=["PA"]), r"line 1: 'views' must be a list as long as 'file_names' \(2\)"),
        (lambda ls: ls[2].pop("split"), r"'split' is given for some studies but not others"),
        (lambda ls: ls[0].update(file_names=["a/pa.jpg", "a/missing.jpg"]), r"line 1 \(a/missing\.jpg\): image .* not found"),
        (lambda ls: ls[3].update(split="holdout"), r"line 4: unknown split 'holdout'"),
        (lambda ls: ls[3].update(study_id="A"), r"line 4: study_id 'A' already used on line 1"),
        # file names must stay inside the folder: absolute (POSIX, Windows) and '..' are refused, naming the line
        (lambda ls: ls[1].update(file_names=[str(_NIH_FRONTAL)]),
         r"line 2: file name '/.*00000001_000\.png' is not a relative path inside the folder"),
        (lambda ls: ls[2].update(file_names=["../b/frontal.png"]),
         r"line 3: file name '\.\./b/frontal\.png' is not a relative path inside the folder"),
        (lambda ls: ls[0].update(file_names=["a/pa.jpg", "a\\..\\..\\c.jpg"]), r"line 1: file name .* is not a relative path"),
        (lambda ls: ls[0].update(file_names=["C:/data/a/pa.jpg"]), r"line 1: file name 'C:/data/a/pa\.jpg' is not a relative"),
    ],
)
def test_study_folder_bad_inputs(folder, edit, message):
    root, lines = folder
    edit(lines)
    _write_jsonl(root, lines)
    with pytest.raises(InvalidDataError, match=message):
        load_study_folder(root)


def test_study_folder_bad_json_and_corrupt_image(folder):
    root, lines = folder
    _write_jsonl(root, lines)
    with open(root / "metadata.jsonl", "a") as handle:
        handle.write("{not json\n")
    with pytest.raises(InvalidDataError, match=r"line 5: not valid JSON"):
        load_study_folder(root)
    _write_jsonl(root, lines)
    (root / "b" / "frontal.png").write_bytes(io.BytesIO(b"\x89PNG\r\n\x1a\n").read())
    with pytest.raises(InvalidDataError, match=r"line 2 \(b/frontal\.png\): image file .* is corrupt"):
        load_study_folder(root)
    ds = load_study_folder(root, skip_invalid=True)
    assert len(ds["validation"]) == 0
