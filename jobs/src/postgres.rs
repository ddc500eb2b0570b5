//! What the workers and the coordinator both say to PostgreSQL about the publications Eddy creates:
//! a job's source releases its publication when the job is cancelled for good, and so does the
//! coordinator when no task of the job runs to do it (the job between two attempts, its worker
//! lost).

/// The comment on a publication Eddy created, before the slots that use it, comma-separated: Eddy
/// drops the publication when the last of them is released, and never one without the mark.
pub const PUBLICATION_MARK: &str = "eddy: used by slots ";

/// Whether `name` is a plain identifier (lower-case letters, digits, `_`; at most 63 bytes), which
/// SQL may hold as it is.
pub fn plain_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
}

/// The lock that serialises changes to `publication`'s comment between jobs (inside a
/// transaction).
pub fn publication_lock(publication: &str) -> String {
    format!("SELECT pg_advisory_xact_lock(hashtext('eddy publication {publication}'))")
}

/// One statement that takes `slot` off the users of `publication` and drops the publication when
/// Eddy created it (it has the mark) and no other slot uses it; a publication of the user's is
/// left alone. `None` when a name is not a plain identifier.
pub fn release_publication(publication: &str, slot: &str) -> Option<String> {
    if !plain_identifier(publication) || !plain_identifier(slot) {
        return None;
    }
    let lock = publication_lock(publication).replacen("SELECT", "PERFORM", 1);
    Some(format!(
        "DO $eddy$
         DECLARE
           mark CONSTANT text := '{PUBLICATION_MARK}';
           note text;
           users text[];
         BEGIN
           {lock};
           SELECT obj_description(oid, 'pg_publication') INTO note FROM pg_publication WHERE pubname = '{publication}';
           IF note IS NULL OR left(note, length(mark)) <> mark THEN
             RETURN;
           END IF;
           users := array_remove(string_to_array(substr(note, length(mark) + 1), ','), '{slot}');
           IF coalesce(cardinality(users), 0) = 0 THEN
             DROP PUBLICATION \"{publication}\";
           ELSE
             EXECUTE format('COMMENT ON PUBLICATION %I IS %L', '{publication}', mark || array_to_string(users, ','));
           END IF;
         END
         $eddy$"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_go_into_the_release() {
        assert!(plain_identifier("eddy_pub") && !plain_identifier("Pub") && !plain_identifier("9a") && !plain_identifier(""));
        assert!(release_publication("p'; DROP TABLE t; --", "s").is_none());
        let sql = release_publication("eddy_pub", "eddy_ingest").unwrap();
        assert!(sql.contains("array_remove(") && sql.contains("'eddy_ingest'") && sql.contains("DROP PUBLICATION \"eddy_pub\";"), "{sql}");
    }
}
