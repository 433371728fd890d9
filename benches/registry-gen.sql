-- Bulk data for the registry benchmark (benches/registry.sh). Not a test.
--
--   psql -v what=records  -v lo=1 -v hi=1000 -v hosp_a=ID -v hosp_b=ID -f registry-gen.sql
--   psql -v what=consents -v lo=1 -v hi=1000 -v hosp_a=ID -v hosp_b=ID -f registry-gen.sql
--
-- Patients lo..hi. Patient p has the key
--   sha256("huren-bench-patient:" || p) as 64 lower-case hex
-- (a stand-in for the keyed BLAKE3 a node computes: same shape, and
-- benches/registry-client.py recomputes it from p) and 1 + p % 5 studies
-- (1 to 5, 3 on average), k = 0 .. p % 5; study k is at hospital A when
-- (p + k) is even, else at hospital B, so most patients have studies at
-- both. Patients with an even p have a granted consent for hospital A (the
-- hospital that asks in the priors benchmark), expiring 2030-01-01.
--
-- The records go in as the registry itself stores them (one row per
-- (hospital, Study Instance UID), record_version 1, the StudyRecord JSON in
-- `record`), through SQL and not through the API: they have no audit
-- entries. Eight kinds of study (CT chest, CT abdomen with contrast, MR
-- head, MR knee, DX chest, US abdomen, MG, CR hand) with their items,
-- body parts, laterality, view positions and plausible sizes; study dates
-- over 2014-2025 (1% of patients have one study without a date); reports
-- final, preliminary or absent. registry-client.py checks every answer's
-- record count against this layout.
\set ON_ERROR_STOP on
SELECT :'what' = 'records' AS do_records, :'what' = 'consents' AS do_consents \gset

\if :do_records
INSERT INTO study_record (hospital_id, study_instance_uid, record_version, patient_key,
                          study_date, retracted, published_at, record)
WITH kinds (i, items, modalities, body_parts, contrast, laterality, view_positions,
            series, instances, bytes_each) AS (
    VALUES
    (0, '[{"code": "CT-CHEST"}]'::jsonb, '["CT"]'::jsonb, '["CHEST"]'::jsonb, 'none',
        '[]'::jsonb, '[]'::jsonb, 3, 620, 525000),
    (1, '[{"code": "CT-ABDOMEN-ENH"}]', '["CT"]', '["ABDOMEN"]', 'plain_and_enhanced',
        '[]', '[]', 6, 1450, 525000),
    (2, '[{"code": "MR-HEAD"}]', '["MR"]', '["HEAD"]', 'none', '[]', '[]', 8, 310, 135000),
    (3, '[{"code": "MR-KNEE", "laterality": "L"}]', '["MR"]', '["KNEE"]', 'none', '["L"]',
        '[]', 5, 140, 135000),
    (4, '[{"code": "DX-CHEST"}]', '["DX"]', '["CHEST"]', 'none', '[]', '["PA", "LL"]',
        2, 2, 9500000),
    (5, '[]', '["US"]', '["ABDOMEN"]', 'none', '[]', '[]', 1, 24, 310000),
    (6, '[{"code": "MG-BREAST", "laterality": "B"}]', '["MG"]', '["BREAST"]', 'none',
        '["L", "R"]', '["CC", "MLO"]', 1, 4, 28000000),
    (7, '[{"code": "CR-HAND", "laterality": "R"}]', '["CR"]', '["HAND"]', 'none', '["R"]',
        '["AP"]', 1, 2, 7200000)
),
g AS (
    SELECT p, k, x.pk,
           '1.2.826.0.1.3680043.10.543.1.' || p || '.' || k AS uid,
           CASE WHEN p % 100 = 0 AND k = 0 THEN NULL
                ELSE date '2014-01-01' + ((p * 7919 + k * 104729) % 4380)::int END AS d,
           CASE (p + 3 * k) % 10 WHEN 0 THEN 'preliminary' WHEN 1 THEN 'none' ELSE 'final' END AS rs
    FROM generate_series(:lo::bigint, :hi::bigint) AS p
    CROSS JOIN LATERAL (SELECT encode(sha256(convert_to('huren-bench-patient:' || p, 'UTF8')), 'hex') AS pk) AS x
    CROSS JOIN LATERAL generate_series(0, (p % 5)::int) AS k
)
SELECT CASE WHEN (g.p + g.k) % 2 = 0 THEN :'hosp_a' ELSE :'hosp_b' END,
       g.uid, 1, g.pk, to_char(g.d, 'YYYY-MM-DD'), 0,
       CASE WHEN g.d IS NULL THEN '2025-06-01T00:00:00.000000Z'
            ELSE to_char(g.d + 1, 'YYYY-MM-DD') || 'T02:00:00.000000Z' END,
       jsonb_build_object(
           'study_instance_uid', g.uid,
           'record_version', 1,
           'patient_key', g.pk,
           'items', kd.items,
           'modalities', kd.modalities,
           'body_parts', kd.body_parts,
           'contrast', kd.contrast,
           'laterality', kd.laterality,
           'view_positions', kd.view_positions,
           'study_date', to_char(g.d, 'YYYY-MM-DD'),
           'study_time', CASE WHEN g.d IS NULL THEN NULL
                              ELSE to_char(time '07:30' + ((g.p * 13 + g.k * 7) % 720) * interval '1 minute',
                                           'HH24:MI:SS') END,
           'report_status', g.rs,
           'report_issued_date', CASE WHEN g.rs = 'final' AND g.d IS NOT NULL
                                      THEN to_char(g.d + (g.p % 3)::int, 'YYYY-MM-DD') END,
           'qc_status', 'passed',
           'images_available', true,
           'number_of_series', kd.series,
           'number_of_instances', kd.instances + (g.p % 7),
           'bytes', (kd.instances + (g.p % 7))::bigint * kd.bytes_each,
           'content_root', encode(sha256(convert_to('huren-bench-root:' || g.p || '.' || g.k, 'UTF8')), 'hex')
       )::text
FROM g JOIN kinds kd ON kd.i = (g.p * 3 + g.k) % 8;
\endif

\if :do_consents
INSERT INTO consent (consent_id, patient_key, hospital_id, method, recorded_by, state,
                     expires_at, created_at, updated_at)
SELECT md5('huren-bench-consent:' || p),
       encode(sha256(convert_to('huren-bench-patient:' || p, 'UTF8')), 'hex'),
       :'hosp_a', 'qr_code', 'bench', 'granted',
       '2030-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z'
FROM generate_series(:lo::bigint, :hi::bigint) AS p
WHERE p % 2 = 0;
\endif
