#!/usr/bin/env python3
"""Synthetic study universe for the query/retrieve benchmark (benches/query.sh).

Study i (i = 0, 1, 2, ...) is a pure function of (--seed, i): the first M
studies are the same whatever the total size, so a small slice can be stored
for real (DICOM files through C-STORE, in huren and in Orthanc) while the rest
of a large index is written as rows directly.

Patients own 1-4 consecutive studies (40,000 patients per 100,000 studies);
about 60% have Chinese names with the ideographic group
("Wang^Xiaoming=王^小明"), the rest Latin names ("Müller^Anna"). Studies
have 1-4 series (CT/MR/DX/US/CR, 15% of series of a second modality), dates
over 10 years (2016-11-27 .. 2026-11-25), and 1-19 instances (mean 10).

Subcommands:

  files     --studies M --out DIR      DICOM Part-10 files (UTF-8, tiny pixel
                                       data) for studies 0..M-1, one instance
                                       per series, DIR/partK/*.dcm (K=0..3)
  rows      --studies N --from M --db URL
                                       index rows for studies M..N-1 written
                                       directly into a huren index whose schema
                                       exists (the node ran its migrations)
  manifest  --studies N --queries Q --out FILE
                                       the C-FIND queries (Q per kind) and each
                                       one's expected number of matches among
                                       studies 0..N-1
  check     --studies M --db URL       compare the rows the node wrote for the
                                       real slice with the universe

--db is sqlite:///path/index.sqlite (or a plain path) or postgres://...
Only the standard library is needed, plus pydicom for `files` and psycopg
(3) for PostgreSQL.
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import json
import os
import random
import sqlite3
import sys
import time
from pathlib import Path

SEED = 20261126
UID_ROOT = "1.2.826.0.1.3680043.8.498.7731"  # pydicom's root + a benchmark arc
DAY0 = dt.date(2016, 11, 27)
DAYS = 3651  # .. 2026-11-25
EXPLICIT_LE = "1.2.840.10008.1.2.1"

CN_FAMILY = [  # (pinyin, hanzi, weight): common surnames, skewed like real ones
    ("Wang", "王", 72), ("Li", "李", 70), ("Zhang", "张", 64), ("Liu", "刘", 53),
    ("Chen", "陈", 45), ("Yang", "杨", 31), ("Huang", "黄", 24), ("Zhao", "赵", 23),
    ("Wu", "吴", 21), ("Zhou", "周", 20), ("Xu", "徐", 14), ("Sun", "孙", 12),
    ("Ma", "马", 12), ("Zhu", "朱", 11), ("Hu", "胡", 10), ("Guo", "郭", 10),
    ("He", "何", 9), ("Lin", "林", 9), ("Gao", "高", 9), ("Luo", "罗", 8),
    ("Zheng", "郑", 8), ("Liang", "梁", 7), ("Xie", "谢", 6), ("Song", "宋", 6),
    ("Tang", "唐", 6), ("Han", "韩", 5), ("Feng", "冯", 5), ("Deng", "邓", 5),
    ("Cao", "曹", 5), ("Peng", "彭", 5), ("Zeng", "曾", 4), ("Xiao", "肖", 4),
    ("Tian", "田", 4), ("Dong", "董", 4), ("Pan", "潘", 4), ("Yuan", "袁", 4),
    ("Cai", "蔡", 3), ("Jiang", "蒋", 3), ("Yu", "余", 3), ("Du", "杜", 3),
    ("Ye", "叶", 3), ("Cheng", "程", 3), ("Wei", "魏", 3), ("Su", "苏", 3),
    ("Lü", "吕", 2), ("Ding", "丁", 2), ("Ren", "任", 2), ("Shen", "沈", 2),
]
CN_GIVEN = [
    ("Xiao", "小"), ("Ming", "明"), ("Hua", "华"), ("Wei", "伟"), ("Fang", "芳"),
    ("Li", "丽"), ("Jun", "军"), ("Jing", "静"), ("Yong", "勇"), ("Yan", "艳"),
    ("Jie", "杰"), ("Tao", "涛"), ("Hong", "红"), ("Lei", "磊"), ("Chao", "超"),
    ("Qiang", "强"), ("Ping", "平"), ("Gang", "刚"), ("Hui", "辉"), ("Xia", "霞"),
    ("Ling", "玲"), ("Yun", "云"), ("Bo", "波"), ("Ning", "宁"), ("Hao", "浩"),
    ("Yu", "宇"), ("Xin", "欣"), ("Rui", "睿"), ("Jia", "佳"), ("Zi", "子"),
    ("Yi", "怡"), ("Chen", "晨"), ("Hai", "海"), ("Feng", "峰"), ("Lan", "兰"),
    ("Mei", "梅"), ("Dan", "丹"), ("Kai", "凯"), ("Peng", "鹏"), ("Bin", "斌"),
    ("Zhi", "志"), ("Guo", "国"), ("Qing", "庆"), ("Shu", "淑"), ("Xue", "雪"),
]
LATIN_FAMILY = [
    "Smith", "Müller", "García", "Rossi", "Dubois", "Novak", "Kowalski", "Jensen",
    "Silva", "Nguyen", "Kim", "Tanaka", "Ivanova", "Schmidt", "Martin", "Bernard",
    "Fischer", "Weber", "Meyer", "Wagner", "Becker", "Hoffmann", "Schulz", "Koch",
    "Richter", "Klein", "Wolf", "Schröder", "Neumann", "Schwarz", "Brown", "Wilson",
    "Taylor", "Johnson", "White", "Lee", "Walker", "Hall", "Allen", "Young",
    "López", "Pérez", "González", "Fernández", "Moreau", "Lefèvre", "Andersson",
    "Nilsson", "Larsen", "Petrov", "Horváth", "Yılmaz", "Costa", "Santos", "Ferrari",
]
LATIN_GIVEN = [
    "Anna", "Maria", "John", "James", "Peter", "Paul", "Thomas", "Michael", "David",
    "Sophie", "Emma", "Laura", "Julia", "Sarah", "Lena", "Clara", "Elena", "Marta",
    "Lucas", "Luca", "Marco", "Jan", "Lars", "Erik", "Karl", "Hans", "Jürgen",
    "François", "Zoë", "Chloé", "Noémie", "André", "José", "Ángel", "Sören",
    "Ingrid", "Astrid", "Olga", "Ivan", "Dmitri", "Hiroshi", "Yuki", "Minh", "Linh",
    "Ji-woo", "Seo-yeon", "Ahmed", "Fatima", "Omar", "Leila", "Noah", "Liam",
    "Olivia", "Ava", "Mia", "Ella", "Henry", "Oscar", "Felix", "Hugo",
]
MODALITIES = [("CT", 35), ("MR", 20), ("DX", 20), ("US", 15), ("CR", 10)]
SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
}
BLOB_SIZE = {"CT": 526_000, "MR": 134_000, "DX": 8_400_000, "US": 1_200_000, "CR": 7_100_000}
DESCRIPTIONS = {
    "CT": [("CT CHEST", "CHEST"), ("CT ABDOMEN", "ABDOMEN"), ("CT HEAD", "HEAD")],
    "MR": [("MR BRAIN", "BRAIN"), ("MR KNEE", "KNEE"), ("MR SPINE", "LSPINE")],
    "DX": [("DX CHEST PA", "CHEST"), ("DX HAND", "HAND")],
    "US": [("US ABDOMEN", "ABDOMEN"), ("US THYROID", "NECK")],
    "CR": [("CR CHEST", "CHEST"), ("CR PELVIS", "PELVIS")],
}


def _weighted(items):
    names = [x[0] if len(x) == 2 else x for x in items]
    cum, total = [], 0
    for x in items:
        total += x[-1]
        cum.append(total)
    return names, cum, total


_MOD_NAMES, _MOD_CUM, _MOD_TOTAL = _weighted(MODALITIES)
_FAM_CUM = []
_t = 0
for _f in CN_FAMILY:
    _t += _f[2]
    _FAM_CUM.append(_t)
_FAM_TOTAL = _t


def pick_modality(rng: random.Random) -> str:
    return _MOD_NAMES[bisect.bisect_right(_MOD_CUM, rng.randrange(_MOD_TOTAL))]


class Patient:
    __slots__ = ("index", "patient_id", "name", "birth_date", "sex", "first_study", "n_studies")


class Series:
    __slots__ = ("uid", "modality", "number", "description", "body_part", "n_instances")


class Study:
    __slots__ = ("index", "patient", "uid", "date", "time", "accession", "study_id",
                 "referring", "description", "series")

    @property
    def modalities(self) -> str:
        return "\\".join(sorted({s.modality for s in self.series}))

    @property
    def n_instances(self) -> int:
        return sum(s.n_instances for s in self.series)


def make_patient(seed: int, j: int, first_study: int) -> Patient:
    rng = random.Random(f"{seed}/patient/{j}")
    p = Patient()
    p.index = j
    p.patient_id = f"HR{seed % 1000:03d}{j:07d}"
    if rng.random() < 0.6:
        fam = CN_FAMILY[bisect.bisect_right(_FAM_CUM, rng.randrange(_FAM_TOTAL))]
        syl = [rng.choice(CN_GIVEN) for _ in range(1 if rng.random() < 0.3 else 2)]
        given = "".join(s[0] for s in syl)
        given = given[0] + given[1:].lower()
        p.name = f"{fam[0]}^{given}={fam[1]}^{''.join(s[1] for s in syl)}"
    else:
        p.name = f"{rng.choice(LATIN_FAMILY)}^{rng.choice(LATIN_GIVEN)}"
    p.birth_date = (dt.date(1930, 1, 1) + dt.timedelta(days=rng.randrange(33000))).strftime("%Y%m%d")
    p.sex = rng.choice("MF")
    p.first_study = first_study
    p.n_studies = rng.randint(1, 4)
    return p


def make_study(seed: int, i: int, patient: Patient) -> Study:
    rng = random.Random(f"{seed}/study/{i}")
    s = Study()
    s.index = i
    s.patient = patient
    s.uid = f"{UID_ROOT}.{seed}.{i + 1}"
    s.date = (DAY0 + dt.timedelta(days=rng.randrange(DAYS))).strftime("%Y%m%d")
    s.time = f"{rng.randrange(7, 22):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}"
    s.accession = f"A{seed % 100:02d}{i:08d}"
    s.study_id = str(rng.randrange(1, 100000))
    s.referring = rng.choice(["Li^Wei=李^伟", "Chen^Jing=陈^静", "Smith^John", "", "Zhou^Ming=周^明"])
    primary = pick_modality(rng)
    s.description, body = rng.choice(DESCRIPTIONS[primary])
    total = rng.randint(1, 19)
    n_series = min(rng.randint(1, 4), total)
    cuts = sorted(rng.sample(range(1, total), n_series - 1)) if n_series > 1 else []
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [total])]
    s.series = []
    for k, size in enumerate(sizes):
        se = Series()
        se.uid = f"{s.uid}.{k + 1}"
        se.modality = primary if k == 0 or rng.random() < 0.85 else pick_modality(rng)
        se.number = k + 1
        se.description = f"{se.modality} SERIES {k + 1}"
        se.body_part = body
        se.n_instances = size
        s.series.append(se)
    return s


def universe(n: int, seed: int = SEED):
    """Studies 0..n-1 in order."""
    j, patient = 0, make_patient(seed, 0, 0)
    for i in range(n):
        if i >= patient.first_study + patient.n_studies:
            j += 1
            patient = make_patient(seed, j, i)
        yield make_study(seed, i, patient)


def instance_uid(series: Series, k: int) -> str:
    return f"{series.uid}.{k + 1}"


# ------------------------------------------------------------------ files


def write_files(n: int, out: Path, seed: int, parts: int = 4) -> dict:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    stamp_path = out.parent / (out.name + ".json")
    want = {"studies": n, "seed": seed, "format": 1}
    if stamp_path.exists() and out.is_dir():
        stamp = json.loads(stamp_path.read_text())
        if all(stamp.get(k) == v for k, v in want.items()):
            return stamp
    t0 = time.time()
    tmp = out.parent / (out.name + ".partial")
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    for k in range(parts):
        (tmp / f"part{k}").mkdir(parents=True)
    files = size = 0
    for st in universe(n, seed):
        p = st.patient
        for se in st.series:
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = SOP_CLASS[se.modality]
            meta.MediaStorageSOPInstanceUID = instance_uid(se, 0)
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds = Dataset()
            ds.file_meta = meta
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.SOPClassUID = SOP_CLASS[se.modality]
            ds.SOPInstanceUID = instance_uid(se, 0)
            ds.StudyDate = st.date
            ds.StudyTime = st.time
            ds.AccessionNumber = st.accession
            ds.Modality = se.modality
            ds.ReferringPhysicianName = st.referring
            ds.StudyDescription = st.description
            ds.SeriesDescription = se.description
            ds.PatientName = p.name
            ds.PatientID = p.patient_id
            ds.PatientBirthDate = p.birth_date
            ds.PatientSex = p.sex
            ds.BodyPartExamined = se.body_part
            ds.StudyInstanceUID = st.uid
            ds.SeriesInstanceUID = se.uid
            ds.StudyID = st.study_id
            ds.SeriesNumber = se.number
            ds.InstanceNumber = 1
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = 8
            ds.Columns = 8
            ds.BitsAllocated = 8
            ds.BitsStored = 8
            ds.HighBit = 7
            ds.PixelRepresentation = 0
            ds.PixelData = bytes((st.index * 7 + se.number + j) & 0xFF for j in range(64))
            path = tmp / f"part{files % parts}" / f"{st.index:07d}-{se.number}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files += 1
            size += path.stat().st_size
    tmp.rename(out)
    stamp = dict(want, files=files, bytes=size, seconds=round(time.time() - t0, 1))
    stamp_path.write_text(json.dumps(stamp) + "\n")
    return stamp


# ------------------------------------------------------------------ database


class Db:
    """The little of sqlite3 / psycopg the generator needs, with $1 placeholders."""

    def __init__(self, url: str):
        if url.startswith("postgres://") or url.startswith("postgresql://"):
            import psycopg
            self.kind = "postgres"
            self.conn = psycopg.connect(url, autocommit=False)
        else:
            path = url
            for pre in ("sqlite://", "sqlite:"):
                if path.startswith(pre):
                    path = path[len(pre):]
                    break
            path = path.split("?")[0]
            if not os.path.exists(path):
                sys.exit(f"query-gen: no SQLite index at {path} (start the node once to create it)")
            self.kind = "sqlite"
            self.conn = sqlite3.connect(path, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = OFF")
            self.conn.execute("PRAGMA cache_size = -1000000")
            self.conn.execute("PRAGMA temp_store = MEMORY")

    def q(self, sql: str, args=()):
        if self.kind == "sqlite":
            sql = sql.replace("%s", "?")
        cur = self.conn.cursor()
        cur.execute(sql, args)
        return cur.fetchall() if cur.description else []

    def columns(self, table: str):
        """[(name, type, notnull, has_default)] of a table as it is now."""
        if self.kind == "sqlite":
            return [(r[1], (r[2] or "").upper(), bool(r[3]), r[4] is not None)
                    for r in self.q(f"PRAGMA table_info({table})")]
        rows = self.q(
            "SELECT column_name, data_type, is_nullable = 'NO', "
            "column_default IS NOT NULL OR is_identity = 'YES' OR is_generated <> 'NEVER', "
            "is_generated <> 'NEVER' "
            "FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = %s ORDER BY ordinal_position", (table,))
        # generated columns cannot be written: leave them out
        return [(r[0], r[1].upper(), r[2], r[3]) for r in rows if not r[4]]


KEY = {"patient": "patient_key", "study": "study_key", "series": "series_key", "instance": "instance_key"}


def fill_unknown(table: str, col: str, ctype: str, row: dict):
    """Value for a column this generator does not know (a later migration)."""
    low = col.lower()
    for base in ("patient_name", "referring_physician_name", "study_description",
                 "series_description", "accession_number", "patient_id"):
        if base in low and base in row and low != base and any(
                w in low for w in ("lower", "fold", "norm", "upper", "ci", "search")):
            v = row[base]
            return v.upper() if "upper" in low else v.lower()
    if "INT" in ctype or "NUM" in ctype or "BIGINT" in ctype:
        return 0
    return ""


def plan_columns(db: Db, table: str, known: list[str], sample: dict):
    cols = db.columns(table)
    names = [c[0] for c in cols]
    missing = [k for k in known if k not in names]
    if missing:
        sys.exit(f"query-gen: table {table} has no column(s) {missing}: the schema changed, update the generator")
    extra = []
    for name, ctype, notnull, has_default in cols:
        if name in known:
            continue
        guess = fill_unknown(table, name, ctype, sample)
        if has_default and guess in ("", 0):
            continue  # let the database fill it
        extra.append((name, ctype))
        print(f"query-gen: {table}.{name} ({ctype}) is not known to the generator; "
              f"filling it with {'a derived value' if guess not in ('', 0) else repr(guess)}",
              file=sys.stderr)
    return known + [e[0] for e in extra], extra


def insert_rows(url: str, n: int, start: int, seed: int, analyze: bool) -> dict:
    db = Db(url)
    t0 = time.time()
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    rnd = random.Random(f"{seed}/hashes/{start}/{n}")

    def key_base(table):
        return db.q(f"SELECT COALESCE(MAX({KEY[table]}), 0) FROM {table}")[0][0]

    existing_patients = dict(db.q("SELECT patient_id, patient_key FROM patient WHERE issuer_of_patient_id = ''"))
    existing_uids = {r[0] for r in db.q("SELECT study_instance_uid FROM study")}
    pk, sk, sek, ik = (key_base(t) for t in ("patient", "study", "series", "instance"))

    P = ["patient_key", "patient_id", "issuer_of_patient_id", "patient_name", "patient_birth_date", "patient_sex"]
    S = ["study_key", "patient_key", "study_instance_uid", "study_date", "study_time", "accession_number",
         "study_id", "referring_physician_name", "study_description", "modalities_in_study",
         "number_of_study_related_series", "number_of_study_related_instances", "last_received_at"]
    SE = ["series_key", "study_key", "series_instance_uid", "modality", "series_number", "series_description",
          "body_part_examined", "number_of_series_related_instances"]
    I = ["instance_key", "series_key", "sop_instance_uid", "sop_class_uid", "instance_number",
         "transfer_syntax_uid", "blob_hash", "blob_size", "calling_ae_title", "received_at", "version",
         "is_current"]
    sample = {"patient_name": "x", "patient_id": "x", "referring_physician_name": "x",
              "study_description": "x", "series_description": "x", "accession_number": "x"}
    plans = {t: plan_columns(db, t, cols, sample) for t, cols in
             (("patient", P), ("study", S), ("series", SE), ("instance", I))}

    def with_extra(table, row: dict):
        cols, extra = plans[table]
        for c, ctype in extra:
            row[c] = fill_unknown(table, c, ctype, row)
        return tuple(row[c] for c in cols)

    existing_series = dict(db.q("SELECT series_instance_uid, series_key FROM series"))
    patients, studies, series, instances = [], [], [], []
    series_add, study_add = [], []  # (added, key): instances 2.. of the real slice's series

    def add_instances(se, key, first):
        nonlocal ik
        cls, size = SOP_CLASS[se.modality], BLOB_SIZE[se.modality]
        for k in range(first, se.n_instances):
            ik += 1
            instances.append((ik, key, instance_uid(se, k), cls, k + 1, EXPLICIT_LE,
                              "%064x" % rnd.getrandbits(256), size, "BENCHGEN", now, 1, 1)
                             + tuple(fill_unknown("instance", c, t, {}) for c, t in plans["instance"][1]))

    for st in universe(n, seed):
        if st.index < start:
            # Stored for real with one instance per series: add the others
            # as rows so that the index holds the full instance count.
            added = 0
            for se in st.series:
                key = existing_series.get(se.uid)
                if key is not None and se.n_instances > 1:
                    add_instances(se, key, 1)
                    series_add.append((se.n_instances - 1, key))
                    added += se.n_instances - 1
            if added:
                study_add.append((added, st.uid))
            continue
        if st.uid in existing_uids:
            sys.exit(f"query-gen: study {st.uid} is already indexed: --from is wrong")
        p = st.patient
        if p.patient_id not in existing_patients:
            pk += 1
            existing_patients[p.patient_id] = pk
            patients.append(with_extra("patient", dict(
                patient_key=pk, patient_id=p.patient_id, issuer_of_patient_id="", patient_name=p.name,
                patient_birth_date=p.birth_date, patient_sex=p.sex)))
        sk += 1
        studies.append(with_extra("study", dict(
            study_key=sk, patient_key=existing_patients[p.patient_id], study_instance_uid=st.uid,
            study_date=st.date, study_time=st.time, accession_number=st.accession, study_id=st.study_id,
            referring_physician_name=st.referring, study_description=st.description,
            modalities_in_study=st.modalities, number_of_study_related_series=len(st.series),
            number_of_study_related_instances=st.n_instances, last_received_at=now)))
        for se in st.series:
            sek += 1
            series.append(with_extra("series", dict(
                series_key=sek, study_key=sk, series_instance_uid=se.uid, modality=se.modality,
                series_number=se.number, series_description=se.description, body_part_examined=se.body_part,
                number_of_series_related_instances=se.n_instances)))
            add_instances(se, sek, 0)
    t_gen = time.time() - t0
    print(f"query-gen: {len(patients)} patients, {len(studies)} studies, {len(series)} series, "
          f"{len(instances)} instances generated in {t_gen:.1f} s; writing ...", file=sys.stderr, flush=True)

    tables = [("patient", patients), ("study", studies), ("series", series), ("instance", instances)]
    updates = [
        ("UPDATE series SET number_of_series_related_instances = number_of_series_related_instances + %s "
         "WHERE series_key = %s", series_add),
        ("UPDATE study SET number_of_study_related_instances = number_of_study_related_instances + %s "
         "WHERE study_instance_uid = %s", study_add),
    ]
    if db.kind == "sqlite":
        _write_sqlite(db, tables, plans, analyze, updates)
    else:
        _write_postgres(db, tables, plans, analyze, updates)
    secs = time.time() - t0
    counts = {t: db.q(f"SELECT COUNT(*) FROM {t}")[0][0] for t in KEY}
    print(f"query-gen: wrote in {secs:.1f} s; index now holds {counts}", file=sys.stderr)
    return dict(counts=counts, seconds=round(secs, 1), added=dict(
        patients=len(patients), studies=len(studies), series=len(series), instances=len(instances)))


def _write_sqlite(db: Db, tables, plans, analyze, updates):
    c = db.conn
    # Triggers off (counts are written directly), secondary indexes rebuilt
    # once at the end instead of maintained row by row.
    triggers = c.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").fetchall()
    indexes = c.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
                        "AND tbl_name IN ('patient','study','series','instance')").fetchall()
    c.execute("BEGIN")
    for name, _ in triggers:
        c.execute(f'DROP TRIGGER "{name}"')
    for name, _ in indexes:
        c.execute(f'DROP INDEX "{name}"')
    for table, rows in tables:
        cols = plans[table][0]
        c.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", rows)
    for sql, rows in updates:
        c.executemany(sql.replace("%s", "?"), rows)
    t = time.time()
    for _, sql in indexes:
        c.execute(sql)
    for _, sql in triggers:
        c.execute(sql)
    c.execute("COMMIT")
    print(f"query-gen: sqlite indexes rebuilt in {time.time() - t:.1f} s", file=sys.stderr)
    if analyze:
        c.execute("ANALYZE")
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _write_postgres(db: Db, tables, plans, analyze, updates):
    c = db.conn
    indexes = db.q("SELECT i.indexname, i.indexdef FROM pg_indexes i WHERE i.schemaname = current_schema() "
                   "AND i.tablename IN ('patient','study','series','instance') AND NOT EXISTS "
                   "(SELECT 1 FROM pg_constraint k WHERE k.conname = i.indexname)")
    for name, _ in indexes:
        db.q(f'DROP INDEX "{name}"')
    for table, rows in tables:
        db.q(f"ALTER TABLE {table} DISABLE TRIGGER USER")
        # GENERATED ALWAYS identity keys: accept ours for the load
        db.q(f"ALTER TABLE {table} ALTER COLUMN {KEY[table]} SET GENERATED BY DEFAULT")
        cols = plans[table][0]
        with c.cursor() as cur:
            with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as cp:
                for r in rows:
                    cp.write_row(r)
        db.q(f"ALTER TABLE {table} ALTER COLUMN {KEY[table]} SET GENERATED ALWAYS")
        db.q(f"SELECT setval(pg_get_serial_sequence('{table}', '{KEY[table]}'), "
             f"(SELECT COALESCE(MAX({KEY[table]}), 1) FROM {table}))")
        db.q(f"ALTER TABLE {table} ENABLE TRIGGER USER")
    with c.cursor() as cur:
        for sql, rows in updates:
            cur.executemany(sql, rows)
    t = time.time()
    for _, sql in indexes:
        db.q(sql)
    c.commit()
    print(f"query-gen: postgres indexes rebuilt in {time.time() - t:.1f} s", file=sys.stderr)
    if analyze:
        c.autocommit = True
        db.q("VACUUM ANALYZE")


def check_rows(url: str, m: int, seed: int) -> int:
    """The node's own rows for studies 0..m-1 against the universe."""
    db = Db(url)
    bad = 0
    rows = {r[0]: r[1:] for r in db.q(
        "SELECT st.study_instance_uid, p.patient_id, p.patient_name, st.study_date, st.modalities_in_study, "
        "st.number_of_study_related_series, st.number_of_study_related_instances "
        "FROM study st JOIN patient p ON p.patient_key = st.patient_key")}
    for st in universe(m, seed):
        want = (st.patient.patient_id, st.patient.name, st.date, st.modalities, len(st.series), len(st.series))
        got = rows.get(st.uid)
        if got is None or tuple(got) != want:
            bad += 1
            if bad <= 5:
                print(f"query-gen: check: study {st.index}: node has {got}, universe says {want}", file=sys.stderr)
    print(f"query-gen: check: {m - bad}/{m} real studies indexed as generated", file=sys.stderr)
    return bad


# ------------------------------------------------------------------ manifest


def manifest(n: int, q: int, seed: int) -> dict:
    rng = random.Random(f"{seed}/queries/{n}")
    studies = list(universe(n, seed))
    by_patient: dict[str, int] = {}
    names: dict[str, str] = {}
    for st in studies:
        by_patient[st.patient.patient_id] = by_patient.get(st.patient.patient_id, 0) + 1
        names[st.patient.patient_id] = st.patient.name
    # PatientID: exact, existing ids
    pids = rng.sample(sorted(by_patient), min(q, len(by_patient)))
    q_pid = [{"PatientID": pid, "expect": by_patient[pid]} for pid in pids]
    # PatientName: "<Family>^<given prefix>*" prefixes matching 5..20 patients
    # (or the most selective ones available at small sizes)
    prefix_patients: dict[str, set] = {}
    for pid, name in names.items():
        latin = name.split("=")[0]
        fam, _, given = latin.partition("^")
        for k in range(1, len(given) + 1):
            prefix_patients.setdefault(f"{fam}^{given[:k]}", set()).add(pid)
    lo, hi = 5, 20
    pool = sorted(p for p, s in prefix_patients.items() if lo <= len(s) <= hi)
    if len(pool) < q:
        pool = sorted(prefix_patients, key=lambda p: (-len(prefix_patients[p]) if len(prefix_patients[p]) <= hi else 0, p))[:max(q, 1)]
    prefixes = rng.sample(pool, min(q, len(pool)))
    while len(prefixes) < q:
        prefixes.append(rng.choice(pool))

    def name_count(prefix):
        return sum(by_patient[pid] for pid in prefix_patients[prefix])
    q_name = [{"PatientName": p + "*", "expect": name_count(p), "patients": len(prefix_patients[p])}
              for p in prefixes]
    # StudyDate: 3-day ranges (inclusive)
    dates = sorted(st.date for st in studies)
    q_date = []
    for _ in range(q):
        d0 = DAY0 + dt.timedelta(days=rng.randrange(DAYS - 2))
        a, b = d0.strftime("%Y%m%d"), (d0 + dt.timedelta(days=2)).strftime("%Y%m%d")
        q_date.append({"StudyDate": f"{a}-{b}",
                       "expect": bisect.bisect_right(dates, b) - bisect.bisect_left(dates, a)})
    # ModalitiesInStudy: one modality, many matches
    mod_count = {m: sum(1 for st in studies if m in st.modalities.split("\\")) for m, _ in MODALITIES}
    q_mod = [{"ModalitiesInStudy": m, "expect": mod_count[m]}
             for m in (MODALITIES[k % len(MODALITIES)][0] for k in range(q))]
    # ModalitiesInStudy + StudyDate (selective combination)
    q_moddate = []
    for _ in range(q):
        d0 = DAY0 + dt.timedelta(days=rng.randrange(DAYS - 2))
        a, b = d0.strftime("%Y%m%d"), (d0 + dt.timedelta(days=2)).strftime("%Y%m%d")
        m = pick_modality(rng)
        cnt = sum(1 for st in studies if a <= st.date <= b and m in st.modalities.split("\\"))
        q_moddate.append({"ModalitiesInStudy": m, "StudyDate": f"{a}-{b}", "expect": cnt})
    return {
        "studies": n, "seed": seed,
        "instances_full": sum(st.n_instances for st in studies),
        "series": sum(len(st.series) for st in studies),
        "patients": len(by_patient),
        "kinds": {"patient_id": q_pid, "patient_name": q_name, "study_date": q_date,
                  "modality": q_mod, "modality_date": q_moddate},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=["files", "rows", "manifest", "check"])
    ap.add_argument("--studies", type=int, required=True)
    ap.add_argument("--from", dest="start", type=int, default=0)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--db")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--analyze", action="store_true", help="ANALYZE after loading (PostgreSQL: VACUUM ANALYZE)")
    a = ap.parse_args()
    if a.cmd == "files":
        print(json.dumps(write_files(a.studies, a.out, a.seed)))
    elif a.cmd == "rows":
        print(json.dumps(insert_rows(a.db, a.studies, a.start, a.seed, a.analyze)))
    elif a.cmd == "manifest":
        m = manifest(a.studies, a.queries, a.seed)
        text = json.dumps(m, ensure_ascii=False, indent=0)
        if a.out:
            a.out.write_text(text + "\n")
        else:
            print(text)
        print(f"query-gen: manifest for {a.studies} studies ({m['patients']} patients, "
              f"{m['instances_full']} instances at full size)", file=sys.stderr)
    else:
        sys.exit(1 if check_rows(a.db, a.studies, a.seed) else 0)


if __name__ == "__main__":
    main()
