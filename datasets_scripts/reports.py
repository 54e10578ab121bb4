"""Findings + impression from free-text radiology reports (MIMIC-CXR style).

A report is split into sections at headings: a line that starts (after spaces) with a name followed by
":". A name counts as a heading when it is a known section name in any case ("Findings:", "IMPRESSION :")
or any ALL-CAPS name ("PA AND LATERAL VIEWS:"); mixed-case phrases that end in ":" inside the text
("Note:") are not headings. Text may follow the colon on the same line.

`extract_findings_impression` returns the FINDINGS text followed by the IMPRESSION text (synonyms:
FINDING, IMPRESSIONS, CONCLUSION(S); a combined "FINDINGS AND IMPRESSION" section counts once), with
whitespace collapsed. Repeated sections (e.g. a second IMPRESSION in an addendum) are all kept, in order.
When a report has neither, it falls back, as MIMIC-CXR's own section script does, to the last paragraph
(blank-line separated) that is not the text of an administrative heading (EXAMINATION, INDICATION,
HISTORY, TECHNIQUE, COMPARISON, NOTIFICATION, RECOMMENDATION(S), WET READ, ...: the first paragraph after
such a heading belongs to it, later ones are free text) and is not a title line such as "FINAL REPORT";
if nothing is left it returns "".
"""

from __future__ import annotations

import re

FINDINGS_NAMES = frozenset({"FINDINGS", "FINDING"})
IMPRESSION_NAMES = frozenset({"IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS"})
COMBINED_NAMES = frozenset(
    {"FINDINGS AND IMPRESSION", "FINDINGS AND IMPRESSIONS", "FINDINGS/IMPRESSION", "IMPRESSION AND FINDINGS",
     "FINDINGS / IMPRESSION"}
)
ADMINISTRATIVE_NAMES = frozenset(
    {"EXAMINATION", "EXAM", "TYPE OF EXAMINATION", "STUDY", "PROCEDURE", "INDICATION", "INDICATIONS",
     "CLINICAL INDICATION", "HISTORY", "CLINICAL HISTORY", "CLINICAL INFORMATION", "REASON FOR EXAM",
     "REASON FOR EXAMINATION", "REASON FOR STUDY", "TECHNIQUE", "COMPARISON", "COMPARISONS", "NOTIFICATION",
     "RECOMMENDATION", "RECOMMENDATIONS", "RECOMMENDATION(S)", "WET READ", "FINAL REPORT", "ADDENDUM",
     "PROVISIONAL FINDINGS IMPRESSION (PFI)", "REFERENCE EXAM", "DATE", "REFERRING PHYSICIAN"}
)
KNOWN_NAMES = FINDINGS_NAMES | IMPRESSION_NAMES | COMBINED_NAMES | ADMINISTRATIVE_NAMES
TITLE_LINES = frozenset({"FINAL REPORT", "ADDENDUM", "WET READ", "PRELIMINARY REPORT"})

_HEADING = re.compile(r"^[ \t]*(?P<name>[A-Za-z][A-Za-z ()/&,-]{0,60}?)[ \t]*:", re.MULTILINE)
_ALL_CAPS_NAME = re.compile(r"^[A-Z][A-Z ()/&,-]*$")


def _normalize(text: str) -> str:
    """Collapses whitespace and drops title lines ("FINAL REPORT", "ADDENDUM", ...)."""
    lines = [ln for ln in text.split("\n") if _canonical(ln.strip(" _-=*")) not in TITLE_LINES]
    return " ".join(" ".join(lines).split())


def _canonical(name: str) -> str:
    return " ".join(name.upper().split())


def split_sections(text: str) -> list[tuple[str | None, str]]:
    """`[(heading or None for the preamble, body text)]` in report order."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    headings = []
    for match in _HEADING.finditer(text):
        name = match.group("name").strip()
        if _canonical(name) in KNOWN_NAMES or _ALL_CAPS_NAME.match(name):
            headings.append((match.start(), match.end(), _canonical(name)))
    sections: list[tuple[str | None, str]] = []
    start = headings[0][0] if headings else len(text)
    sections.append((None, text[:start]))
    for i, (_, end, name) in enumerate(headings):
        stop = headings[i + 1][0] if i + 1 < len(headings) else len(text)
        sections.append((name, text[end:stop]))
    return sections


def _last_paragraph(sections: list[tuple[str | None, str]]) -> str:
    paragraphs = []
    for name, body in sections:
        section_paragraphs = []
        for paragraph in re.split(r"\n[ \t]*\n", body):
            paragraph = _normalize(paragraph)
            if paragraph:
                section_paragraphs.append(paragraph)
        if name in ADMINISTRATIVE_NAMES:
            section_paragraphs = section_paragraphs[1:]  # the heading's own text; later paragraphs are free text
        paragraphs.extend(section_paragraphs)
    return paragraphs[-1] if paragraphs else ""


def extract_findings_impression(text: str) -> str:
    """Findings + impression of a free-text report, whitespace-normalized (fallback: last paragraph)."""
    sections = split_sections(text)
    findings = [_normalize(body) for name, body in sections if name in FINDINGS_NAMES or name in COMBINED_NAMES]
    impression = [_normalize(body) for name, body in sections if name in IMPRESSION_NAMES]
    parts = [p for p in findings + impression if p]
    if parts:
        return " ".join(parts)
    return _last_paragraph(sections)
