"""extract_findings_impression on MIMIC-style free-text reports composed from real Open-i report texts."""

import html
import re
import tarfile
import textwrap

import pytest

from datasets_scripts import extract_findings_impression
from datasets_scripts.reports import split_sections

_SECTION = re.compile(r'<AbstractText Label="(?P<label>[A-Z]+)"(?:/>|>(?P<text>.*?)</AbstractText>)', re.S)


def _norm(text):
    return " ".join(text.split())


@pytest.fixture(scope="module")
def open_i_sections(shared_data_dir):
    """{xml name: {COMPARISON, INDICATION, FINDINGS, IMPRESSION}} parsed with a regex (not the loader's parser)."""
    out = {}
    with tarfile.open(shared_data_dir / "iu_xray" / "NLMCXR_reports.tgz") as archive:
        for member in archive.getmembers():
            if not member.name.endswith(".xml"):
                continue
            content = archive.extractfile(member).read().decode("utf-8")
            sections = {m["label"]: _norm(html.unescape(m["text"] or "")) for m in _SECTION.finditer(content)}
            out[member.name.rsplit("/", 1)[-1]] = sections
    return out


def mimic_style(sections, findings=True, impression=True, style="standard", free_paragraph=None):
    """A report laid out like MIMIC-CXR's text files, holding the given real sections."""
    nl = "\r\n" if style == "crlf" else "\n"
    lines = ["                                 FINAL REPORT", " EXAMINATION:  CHEST (PA AND LAT)", " ",
             f" INDICATION:  {sections.get('INDICATION') or '___'}", " ", " TECHNIQUE:  Chest PA and lateral", " ",
             f" COMPARISON:  {sections.get('COMPARISON') or 'None.'}", " "]
    heads = {"standard": ("FINDINGS:", "IMPRESSION:"), "crlf": ("FINDINGS:", "IMPRESSION:"),
             "lower_inline": ("Findings:", "impression :")}[style]
    for wanted, head, key in ((findings, heads[0], "FINDINGS"), (impression, heads[1], "IMPRESSION")):
        if wanted and sections.get(key):
            body = textwrap.wrap(sections[key], 75, break_on_hyphens=False)
            if style == "lower_inline":
                lines += [f" {head} {body[0]}"] + [f" {b}" for b in body[1:]] + [" "]
            else:
                lines += [f" {head}", " "] + [f" {b}" for b in body] + [" "]
    if free_paragraph:
        lines += [f" {b}" for b in textwrap.wrap(free_paragraph, 75, break_on_hyphens=False)] + [" "]
    return nl.join(lines) + nl


@pytest.mark.parametrize("style", ["standard", "crlf", "lower_inline"])
def test_findings_and_impression_on_real_reports(open_i_sections, style):
    both = [s for _, s in sorted(open_i_sections.items()) if s.get("FINDINGS") and s.get("IMPRESSION")][:200]
    assert len(both) == 200
    for sections in both:
        expected = f"{sections['FINDINGS']} {sections['IMPRESSION']}"
        assert extract_findings_impression(mimic_style(sections, style=style)) == expected


def test_only_impression_real_report(open_i_sections):
    sections = open_i_sections["1002.xml"]  # real report: indication + impression, empty findings
    assert not sections["FINDINGS"] and sections["IMPRESSION"]
    text = mimic_style(sections)
    assert "FINDINGS" not in text
    assert extract_findings_impression(text) == "Status post left mastectomy. Heart size normal. Lungs are clear."


def test_only_findings_real_report(open_i_sections):
    sections = open_i_sections["1084.xml"]
    assert sections["FINDINGS"] and not sections["IMPRESSION"]
    assert extract_findings_impression(mimic_style(sections)) == sections["FINDINGS"]


def test_neither_section_falls_back_to_last_paragraph(open_i_sections):
    donor = open_i_sections["1.xml"]["FINDINGS"]  # real findings text, written without a heading
    sections = open_i_sections["1137.xml"]  # real report with neither findings nor impression
    assert not sections["FINDINGS"] and not sections["IMPRESSION"]
    text = mimic_style(sections, free_paragraph=donor)
    assert extract_findings_impression(text) == donor
    # nothing but administrative sections and the title: empty (the loaders then drop the study)
    assert extract_findings_impression(mimic_style(sections)) == ""


def test_admin_text_and_notification_are_not_returned():
    text = (" FINAL REPORT\n INDICATION: cough\n\n Heart size normal. Lungs clear.\n\n"
            " NOTIFICATION: Dr. ___ was called at 10:30.\n")
    assert extract_findings_impression(text) == "Heart size normal. Lungs clear."


def test_combined_heading_repeated_sections_and_colons_in_text():
    text = ("FINDINGS AND IMPRESSION: Lungs clear. Note: port in place.\n\nIMPRESSION: No acute process.\n\n"
            "ADDENDUM\nIMPRESSION: Correction: no change.\n")
    assert extract_findings_impression(text) == (
        "Lungs clear. Note: port in place. No acute process. Correction: no change."
    )
    names = [name for name, _ in split_sections(text)]
    assert names == [None, "FINDINGS AND IMPRESSION", "IMPRESSION", "IMPRESSION"]


def test_unknown_all_caps_heading_ends_findings():
    text = "FINDINGS: Lungs clear.\nRECOMMENDATION(S): follow-up CT.\nPA AND LATERAL: other text\n"
    assert extract_findings_impression(text) == "Lungs clear."
