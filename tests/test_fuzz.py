"""Property tests for the code that reads what sites type: the CSV reader and the text parsers.

Sites send arbitrary Unicode (Chinese verbatim terms, NUL bytes from broken EDC exports, mixed
line endings, stray quotes, megabyte comments). Whatever arrives, the reader must either account
for every record (same records as Python's csv module, ragged ones reported) or reject the
file with a clear transfer problem; the parsers must never raise and must return a valid value
or null. Hypothesis runs derandomized with bounded examples, so CI sees the same cases each time.
"""

from __future__ import annotations

import csv
import io
import math
import re
import sys
from contextlib import contextmanager
from datetime import date

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline import transfers
from pipeline.derivations.dose_labels import dose_particles
from pipeline.derivations.iso_dates import MONTHS, is_site_time, site_date_to_iso
from pipeline.derivations.lab_unit_conversions import format_number, parse_result

FUZZ = settings(derandomize=True, deadline=None, max_examples=150, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])
# the parsers work on whole columns: fewer, longer lists cost less than many short ones
PARSERS = settings(FUZZ, max_examples=120)

# --- the CSV reader ------------------------------------------------------------------------

SCHEMA = {"columns": {"A": {"required": True}, "B": {}, "C": {}}}
TRANSFER_PROBLEMS = {"TRF-CSV", "TRF-COLUMNS", "TRF-DECODE"}
SPECIAL = [",", '"', '""', "\r", "\n", "\r\n", "\x00", "\ufeff", " ", "\t", "数据", "头痛", "é", "\u2028", "\x85"]

characters = st.one_of(st.sampled_from(SPECIAL), st.characters(exclude_categories=("Cs",)))


def texts(max_size: int):
    """Arbitrary Unicode (no lone surrogates: they cannot be encoded), rich in CSV specials."""
    return st.lists(characters, max_size=max_size).map("".join)


field_text = st.one_of(
    texts(12),
    st.sampled_from(["", "1", "2026-03-07", "07 MAR 2026", "<0.5", "POSITIVE"]),
    # longer than csv.field_size_limit() (131072) and longer than a line buffer
    st.integers(130_000, 140_000).map(lambda n: "长" * n),
)
header_name = st.sampled_from(["A", "a", " A ", "B", "b", "C", "c ", "D", "", "A,B", '"A"', "数据"])
terminator = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def csv_documents(draw) -> tuple[bytes, str]:
    """CSV bytes of a random shape and the declared encoding: mostly well-formed RFC 4180 files
    (with any content, ragged rows and mixed line endings), plus raw unquoted writing (stray
    quotes), cut files and stray bytes."""
    header = draw(st.lists(header_name, min_size=1, max_size=5))
    if draw(st.booleans()):
        header = ["A"] + header
    width = len(header)
    n_rows = draw(st.integers(0, 6))
    rows = []
    for _ in range(n_rows):
        size = draw(st.one_of(st.just(width), st.integers(1, width + 2)))
        rows.append(draw(st.lists(field_text, min_size=size, max_size=size)))
    style = draw(st.sampled_from(["minimal", "all", "raw"]))
    buffer = io.StringIO(newline="")
    for record in [header] + rows:
        end = draw(terminator)
        if style == "raw":
            buffer.write(",".join(record) + end)
        else:
            csv.writer(buffer, lineterminator=end,
                       quoting=csv.QUOTE_ALL if style == "all" else csv.QUOTE_MINIMAL).writerow(record)
    text = buffer.getvalue()
    if draw(st.booleans()):
        text += draw(st.sampled_from(["", "\n", "\r\n\r\n", "\n\n\n"]))
    if draw(st.integers(0, 9)) == 0 and text:  # a stray quote somewhere
        at = draw(st.integers(0, len(text)))
        text = text[:at] + '"' + text[at:]
    if draw(st.integers(0, 9)) == 0 and text:  # a file cut short (still being copied)
        text = text[:draw(st.integers(0, len(text)))]
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "gb18030"]))
    data = text.encode("utf-8" if encoding == "utf-8" else "gb18030")
    if encoding == "utf-8" and draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    if draw(st.integers(0, 14)) == 0 and data:  # a byte that may not decode
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\x80", b"\xc3"])) + data[at:]
    return data, encoding


@contextmanager
def unlimited_fields():
    """The oracle reads fields of any length (the csv module stops at 131072 characters)."""
    limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)
    try:
        yield
    finally:
        csv.field_size_limit(limit)


def oracle(text: str, strict: bool) -> list[list[str]] | None:
    """Records as Python's csv module reads them (blank lines are not records); None if it refuses."""
    with unlimited_fields():
        try:
            return [r for r in csv.reader(io.StringIO(text, newline=""), strict=strict) if r]
        except csv.Error:
            return None


# RFC 4180's grammar: a field is quoted (quotes inside doubled) or holds no quote at all. A file
# outside it (`"Sore" throat`, `ab"cd`, `"" throat`) is refused, never read with a value guessed.
QUOTED, BARE = r'"(?:[^"]|"")*+"', r'[^",\r\n]*+'
RECORD = rf'(?:{QUOTED}|{BARE})(?:,(?:{QUOTED}|{BARE}))*+'
RFC4180 = re.compile(rf'(?:{RECORD}(?:\r\n|\n|\r))*+{RECORD}')


def decoded(data: bytes, encoding: str) -> str | None:
    try:
        return data.decode("utf-8-sig" if encoding == "utf-8" else "gb18030").removeprefix("\ufeff")
    except UnicodeDecodeError:
        return None


def read(data: bytes, encoding: str):
    transfer = transfers.Transfer(site="01", name="20261123T220005", path=None, encoding=encoding)
    return transfer, transfers.read_csv_file(transfer, "lb.csv", data, SCHEMA)


def check_reader(data: bytes, encoding: str) -> None:
    transfer, raw = read(data, encoding)  # must not raise, whatever the bytes
    text = decoded(data, encoding)
    if raw is None:
        assert len(transfer.problems) == 1, transfer.problems
        problem = transfer.problems[0]
        assert problem["RULE"] in TRANSFER_PROBLEMS and problem["SEVERITY"] == "ERROR"
        assert problem["FILE"] == "lb.csv" and problem["MESSAGE"].startswith("lb.csv: ")
        assert problem["MESSAGE"].isprintable(), problem["MESSAGE"]  # one line, no NUL
        if problem["RULE"] == "TRF-DECODE":
            assert text is None, "decodable bytes rejected as undecodable"
            return
        assert text is not None, "undecodable bytes accepted by the decoder"
        records = oracle(text, strict=False)
        if problem["RULE"] == "TRF-CSV":
            # only an empty file, one the csv module itself refuses in strict mode, or one outside
            # RFC 4180's grammar may be refused
            assert not records or oracle(text, strict=True) is None or not RFC4180.fullmatch(text), (
                problem["MESSAGE"], records[:3])
        else:
            names = [h.strip().upper() for h in records[0]]
            repeated_spec_column = any(names.count(c) > 1 for c in SCHEMA["columns"])
            assert repeated_spec_column or "A" not in names, (problem["MESSAGE"], names)
        return

    assert text is not None, "undecodable bytes were read"
    assert not transfer.problems, transfer.problems
    assert RFC4180.fullmatch(text), "a file outside RFC 4180 was read as data"
    records = oracle(text, strict=False)
    assert records, "a file without records was read"
    header, data_records = records[0], records[1:]
    width = len(header)
    # every record accounted for: same number, same numbering, same values
    assert raw.rows == len(data_records) == len(raw.data)
    assert raw.data["src_row"].tolist() == list(range(1, raw.rows + 1))
    ragged = [(i, len(r)) for i, r in enumerate(data_records, start=1) if len(r) != width]
    reported = [(f["ROW"], int(f["MESSAGE"].split(" fields")[0].rsplit(" ", 1)[1]))
                for f in raw.findings if f["RULE"] == "RAW-FIELD-COUNT"]
    assert reported == ragged
    assert raw.data["src_ragged"].tolist() == [len(r) != width for r in data_records]
    names = [h.strip().upper() for h in header]
    for column in SCHEMA["columns"]:
        got = [None if pd.isna(v) else v for v in raw.data[column]]
        if column in names:
            i = names.index(column)
            want = [(r[i] if i < len(r) else "") or None for r in data_records]
        else:
            want = [None] * len(data_records)
        assert got == want, column
    extra = [f for f in raw.findings if f["RULE"] == "RAW-EXTRA-COLUMN"]
    assert len(extra) == len({n for n in names if n not in SCHEMA["columns"]})   # once per name
    for finding in raw.findings:  # one line each, whatever the header held
        assert finding["MESSAGE"].isprintable(), finding["MESSAGE"]


@FUZZ
@given(csv_documents())
@example((b"", "utf-8"))
@example((b"\xef\xbb\xbf", "utf-8"))
@example((b"A,B\n", "utf-8"))
@example((b"A,B\r\n\r\n", "utf-8"))
@example((b"\r\n\n", "utf-8"))
@example((("A,B\n\"" + "x" * 140_000 + "\",1\n2\n").encode(), "utf-8"))  # long field, ragged file
@example((b'A,B\n"1,2\n3,4\n', "utf-8"))  # quote never closed
@example((b"A,B\n\x00,\x00\n", "utf-8"))
@example((b'A,B\n"a\r\nb",2\r3,4\n', "utf-8"))
@example((b'A,B\n"Sore" throat,1\n', "utf-8"))   # text after a closing quote
@example((b'A,B\nab"cd,1\n', "utf-8"))            # a quote in a field that is not quoted
@example((b'A,B\n"Sore""" throat,1\n', "utf-8"))   # text after a doubled quote and the closing one
@example((b'A,B\n1,"x,"" y"\n', "utf-8"))          # legal: a comma and a doubled quote inside quotes
@example(("A,数据\r\n头痛,\r\n".encode("gb18030"), "gb18030"))
def test_csv_reader_accounts_for_every_record_or_rejects_the_file(document):
    """read_csv_file never raises and never loses a record silently (site-export-spec.md 4)."""
    check_reader(*document)


@settings(FUZZ, max_examples=800)
@given(st.sampled_from(["A,B\n", "A,B\r\n", "a\n", '"A","B"\r', ""]),
       st.lists(st.sampled_from(list('x,"\n\r\x00 ') + ['""', "\r\n", "A", "数"]), max_size=40).map("".join))
def test_csv_reader_on_quote_and_line_break_soup(header, body):
    """Short files made of nothing but separators, quotes and line breaks: where the Arrow fast
    path and the csv-module fallback would disagree, if anywhere."""
    check_reader((header + body).encode(), "utf-8")


def test_header_only_file_has_no_rows():
    for data in (b"A,B", b"A,B\n", b"A,B\r\n\r\n", b"\xef\xbb\xbfa,b\n"):
        transfer, raw = read(data, "utf-8")
        assert raw is not None and raw.rows == 0 and raw.data.empty and not transfer.problems


def test_empty_file_is_a_clear_problem():
    for data in (b"", b"\n", b"\r\n\r\n", b"\xef\xbb\xbf"):
        transfer, raw = read(data, "utf-8")
        assert raw is None
        assert [p["RULE"] for p in transfer.problems] == ["TRF-CSV"]
        assert "the file is empty" in transfer.problems[0]["MESSAGE"]


def test_long_free_text_reads_the_same_with_or_without_a_ragged_row():
    """A 140 000-character comment is legal free text; a ragged row elsewhere in the file must
    not turn it into a rejected transfer (the fallback parser used to stop at 131072)."""
    comment = "病" * 140_000
    clean = f'A,B\n"{comment}",1\n2,3\n'.encode()
    ragged = f'A,B\n"{comment}",1\n2\n'.encode()
    for data, ragged_rows in ((clean, []), (ragged, [2])):
        transfer, raw = read(data, "utf-8")
        assert raw is not None, transfer.problems
        assert raw.data["A"].iloc[0] == comment
        assert [f["ROW"] for f in raw.findings if f["RULE"] == "RAW-FIELD-COUNT"] == ragged_rows


# --- dates and times -----------------------------------------------------------------------

ISO_DATE = re.compile(r"[0-9]{4}(?:-[0-9]{2}(?:-[0-9]{2})?)?")
DATE_CHARS = st.sampled_from(list("0123456789-: UNK") + ["MAR", "FEB", "UNK", "UN", "\n", "٣", "２", "\x00"])
date_like = st.one_of(
    texts(15),
    st.lists(DATE_CHARS, max_size=8).map("".join),
    st.builds(lambda d, m, y: f"{d} {m} {y}", st.sampled_from(["01", "29", "30", "31", "UN", "00", "32", "1"]),
              st.sampled_from(list(MONTHS) + ["UNK", "Mar", "MARCH"]), st.sampled_from(["2026", "2028", "1899", "2101", "026"])),
)


def is_real_iso_date(text: str) -> bool:
    if not ISO_DATE.fullmatch(text) or not 1900 <= int(text[:4]) <= 2100:
        return False
    if len(text) == 7:
        return 1 <= int(text[5:7]) <= 12
    if len(text) == 10:
        try:
            date.fromisoformat(text)
        except ValueError:
            return False
    return True


CDASH_FORM = re.compile(r"([0-9]{2}|UN) (" + "|".join(MONTHS) + r"|UNK) ([0-9]{4})")
ISO_FORM = re.compile(r"([0-9]{4})(?:-([0-9]{2})(?:-([0-9]{2}))?)?")


def reference_iso(text: str) -> str | None:
    """The spec's reading of a site date, written out longhand (site-export-spec.md section 4)."""
    if match := CDASH_FORM.fullmatch(text):
        day, month, year = match.groups()
        month = None if month == "UNK" else f"{MONTHS.index(month) + 1:02d}"
        day = None if day == "UN" or month is None else day  # a day without its month: year only
    elif match := ISO_FORM.fullmatch(text):
        year, month, day = match.groups()
    else:
        return None
    iso = "-".join(p for p in (year, month, day) if p is not None)
    return iso if is_real_iso_date(iso) else None


@PARSERS
@given(st.lists(date_like, max_size=80))
@example(["UN UNK 2026", "07 UNK 2026", "٢٠٢٦-03-07", "31 FEB 2026", "29 FEB 2028", "2026-13", "", "\x00"])
def test_site_date_to_iso_gives_the_spec_reading_or_null(texts):
    """Arbitrary text never raises; the result is the date the spec reads in it, or null."""
    values = pd.Series(texts, dtype="str")
    result = site_date_to_iso(values)
    assert len(result) == len(values) and result.index.equals(values.index)
    for text, iso in zip(texts, result):
        iso = None if pd.isna(iso) else iso
        assert iso == reference_iso(text), text


def test_date_with_trailing_line_break_is_not_a_date():
    assert site_date_to_iso(pd.Series(["2026-03-07\n", "07 MAR 2026\n"], dtype="str")).isna().all()


@st.composite
def site_dates(draw):
    """A valid site date in the precision and in both written forms the spec allows, and its ISO value."""
    day = draw(st.dates(min_value=date(1900, 1, 1), max_value=date(2100, 12, 31)))
    precision = draw(st.sampled_from(["day", "month", "year"]))
    month = MONTHS[day.month - 1]
    if precision == "day":
        return f"{day:%d} {month} {day.year:04d}", day.isoformat(), day.isoformat()
    if precision == "month":
        return f"UN {month} {day.year:04d}", f"{day.year:04d}-{day.month:02d}", f"{day.year:04d}-{day.month:02d}"
    return f"UN UNK {day.year:04d}", f"{day.year:04d}", f"{day.year:04d}"


@PARSERS
@given(st.lists(site_dates(), min_size=1, max_size=200))
def test_valid_dates_in_both_forms_give_the_same_iso_date(dates):
    """`07 MAR 2026` and `2026-03-07` (and their partial forms) are one date, mixed in one column."""
    cdash = pd.Series([d[0] for d in dates], dtype="str")
    iso = pd.Series([d[1] for d in dates], dtype="str")
    expected = [d[2] for d in dates]
    assert site_date_to_iso(cdash).tolist() == expected
    assert site_date_to_iso(iso).tolist() == expected
    mixed = pd.Series([d[i % 2] for i, d in enumerate(dates)], dtype="str")
    assert site_date_to_iso(mixed).tolist() == expected


TIME = re.compile(r"(?:[01][0-9]|2[0-3]):[0-5][0-9]")
# Known bug in pipeline/derivations/iso_dates.py (not owned here, reported): `\d` accepts any
# Unicode digit and `$` matches before a final newline, so is_site_time("0٨:30") and
# is_site_time("08:30\n") are True and --DTC gets "2026-03-07T0٨:30".
KNOWN_TIME_BUG = re.compile(r"(?:[01]\d|2[0-3]):[0-5]\d\n?")


@PARSERS
@given(st.lists(st.one_of(texts(7),
                          st.lists(st.sampled_from(list("0123456789:") + ["٨", "９", "\n"]), max_size=6).map("".join)),
                max_size=80))
@example(["08:30", "23:59", "24:00", "8:30", "08:60", "", "\x00"])
def test_is_site_time_is_true_only_for_hh_mm(texts):
    values = pd.Series(texts, dtype="str")
    result = is_site_time(values)
    for text, flag in zip(texts, result):
        assert not pd.isna(flag)
        if KNOWN_TIME_BUG.fullmatch(text) and not TIME.fullmatch(text):
            continue  # see test_time_with_unicode_digit_or_newline_is_not_a_time
        assert bool(flag) == bool(TIME.fullmatch(text)), text


def test_time_with_unicode_digit_or_newline_is_not_a_time():
    assert not is_site_time(pd.Series(["0٨:30", "1９:00", "08:30\n"], dtype="str")).any()


# --- dose labels ---------------------------------------------------------------------------

label_like = st.one_of(
    texts(12),
    st.lists(st.sampled_from(list("0123456789.eEx^") + ["10^", "x10^", "E1", "\n"]), max_size=8).map("".join),
)


@PARSERS
@given(st.lists(label_like, max_size=80))
@example(["2.5E10", "2.5e10", "25000000000", "2.5x10^10", "2.5X10^10", "", "1e", "."])
def test_dose_particles_is_a_finite_non_negative_number_or_null(labels):
    result = dose_particles(pd.Series(labels, dtype="str"))
    assert result.dtype == "float64" and len(result) == len(labels)
    for label, value in zip(labels, result):
        if not math.isnan(value):
            assert math.isfinite(value) and value >= 0, (label, value)


@st.composite
def dose_labels(draw):
    mantissa = draw(st.decimals(min_value="0.1", max_value="9.9", places=1))
    exponent = draw(st.integers(9, 12))
    value = float(mantissa) * 10.0 ** exponent
    forms = [f"{mantissa}E{exponent}", f"{mantissa}e{exponent}", f"{mantissa}x10^{exponent}", f"{round(value)}"]
    return draw(st.sampled_from(forms)), value


@PARSERS
@given(st.lists(dose_labels(), min_size=1, max_size=80))
def test_every_label_form_of_a_dose_reads_as_that_dose(labels):
    result = dose_particles(pd.Series([label for label, _ in labels], dtype="str"))
    for (label, value), got in zip(labels, result):
        assert got == pytest.approx(value, rel=1e-12), label


def test_absurd_dose_label_is_not_a_dose():
    assert dose_particles(pd.Series(["9" * 400], dtype="str")).isna().all()


# --- lab results ---------------------------------------------------------------------------

KINDS = {"number", "censored", "titre", "qualitative", "below_lloq", "text"}
result_like = st.one_of(
    texts(10),
    st.lists(st.sampled_from(list("0123456789.+-eE<>=: ") + ["1:", "<=", "LLOQ", "POSITIVE", "negative", "٣"]),
             max_size=6).map("".join),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
# Known bugs in pipeline/derivations/lab_unit_conversions.py (reported): "1e999" reads as the
# number inf, and a result in non-ASCII digits ("１２.５" from a Chinese input method) is kind
# "number" with no number, so it is mapped with empty LBSTRESC/LBSTRESN and no finding.
KNOWN_INFINITE = re.compile(r"[+-]?[0-9.]*[eE][+-]?[0-9]{3,}")


def known_result_bug(text: str) -> bool:
    return bool(KNOWN_INFINITE.fullmatch(text.strip("<>= "))) or any(c.isdigit() and not c.isascii() for c in text)



@PARSERS
@given(st.lists(result_like, max_size=80))
@example(["3.5", "<0.5", ">= 10", "1:32", "POSITIVE", "<LLOQ", "", "nan", "inf", "1e999", "٣.٥"])
def test_parse_result_never_raises_and_reads_numbers_as_written(texts):
    values = pd.Series(texts, dtype="str")
    parsed = parse_result(values)
    assert list(parsed.columns) == ["kind", "operator", "number"] and len(parsed) == len(values)
    for text, kind, operator, number in zip(texts, parsed["kind"], parsed["operator"], parsed["number"]):
        assert kind in KINDS, (text, kind)
        if known_result_bug(text):
            continue  # see test_infinite_or_non_ascii_lab_result_is_not_a_number
        if kind == "number":
            # pandas' fast float parser may be 1 ulp off Python's (e.g. "+3e30"); harmless at 10 digits
            assert math.isfinite(number) and number == pytest.approx(float(text), rel=1e-15, abs=0), (text, number)
        elif kind == "censored":
            assert operator in ("<", "<=", ">", ">=") and text.startswith(operator)
            assert math.isfinite(number), (text, number)
            assert number == pytest.approx(float(text[len(operator):].strip()), rel=1e-15, abs=0), (text, number)
        else:
            assert math.isnan(number), (text, kind, number)


@pytest.mark.parametrize("text", ["1e999", "<1e999", "１２.５", "٣.٥", "<０.５"])
def test_infinite_or_non_ascii_lab_result_is_not_a_number(text):
    """Either not a number (held back as RAW-LB-RESULT) or a finite number: never a number without value."""
    parsed = parse_result(pd.Series([text], dtype="str")).iloc[0]
    assert parsed["kind"] not in ("number", "censored") or math.isfinite(parsed["number"])


@PARSERS
@given(st.lists(st.one_of(st.floats(min_value=-1e9, max_value=1e9).filter(lambda x: x == 0 or abs(x) >= 1e-9),
                          st.just(float("nan")), st.floats(min_value=1e-9, max_value=1e-3)), max_size=30))
@example([0.1 + 0.2, 3.5 * 0.1, 1 / 3, -2.5, 0.0, 123456789.0, 1e-9])
def test_format_number_gives_the_number_at_ten_significant_digits(numbers):
    """The text LBSTRESC carries: parses back to the value rounded to 10 significant digits."""
    values = pd.Series(numbers, dtype="float64")
    text = format_number(values)
    assert len(text) == len(values)
    for number, out in zip(numbers, text):
        if math.isnan(number):
            assert pd.isna(out)
            continue
        assert isinstance(out, str)
        assert float(out) == float(f"{number:.10g}"), (number, out)


@FUZZ
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=30))
def test_format_number_never_raises_and_gives_a_number_or_null(numbers):
    text = format_number(pd.Series(numbers, dtype="float64"))
    for number, out in zip(numbers, text):
        if pd.isna(out):
            continue
        assert math.isfinite(number), (number, out)
        assert math.isfinite(float(out)), (number, out)


def test_format_number_is_exact_at_every_magnitude():
    values = pd.Series([123456789012345.0, 1e-300, 1.7976931348623157e308], dtype="float64")
    with np.errstate(all="ignore"):
        text = format_number(values)
    assert text.notna().all()
    # 10 significant digits, except where that rounding would overflow to infinity.
    expected = [float(f"{v:.10g}") if math.isfinite(float(f"{v:.10g}")) else v for v in values]
    assert [float(t) for t in text] == expected
