-- Patient's Name from its second component group (Ideographic) on: the
-- matcher's prefix range for a name pattern without cased letters (王*)
-- also tries this group, since Chinese names sit in either group.
CREATE INDEX patient_name_group2_idx ON patient (substr(patient_name, instr(patient_name, '=') + 1));
