//! Wildcard and person-name matching in Rust: the exact semantics the SQL
//! prefilter approximates.

/// DICOM wildcard matching (PS3.4 C.2.2.2.4): `*` any run of characters,
/// `?` exactly one character.
pub fn wildcard_match(pattern: &str, value: &str, case_insensitive: bool) -> bool {
    let fold = |s: &str| -> Vec<char> {
        if case_insensitive {
            s.chars().flat_map(char::to_lowercase).collect()
        } else {
            s.chars().collect()
        }
    };
    let p = fold(pattern);
    let v = fold(value);
    // Iterative matching with backtracking to the last `*`: linear in
    // practice, no recursion for hostile patterns.
    let (mut pi, mut vi) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == v[vi]) {
            pi += 1;
            vi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, vi));
            pi += 1;
        } else if let Some((sp, sv)) = star {
            pi = sp + 1;
            vi = sv + 1;
            star = Some((sp, sv + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Person-name matching. A name matches when the pattern matches the whole
/// value (PS3.4's single-value and wildcard matching), or component by
/// component: each component the pattern gives (family, given, middle,
/// prefix, suffix) matches the stored one, the components it leaves out
/// match anything. A pattern of one component group is tried against each
/// of the value's groups (Alphabetic, Ideographic, Phonetic), so `王*` finds
/// `Wang^Xiaoming=王^小明`; a pattern with `=` matches group by group.
/// Fuzzy matching makes every given component a prefix.
pub fn name_matches(pattern: &str, value: &str, case_insensitive: bool, fuzzy: bool) -> bool {
    if !fuzzy && wildcard_match(pattern, value, case_insensitive) {
        return true;
    }
    let pattern_groups: Vec<&str> = pattern.split('=').collect();
    let value_groups: Vec<&str> = value.split('=').collect();
    if pattern_groups.len() == 1 {
        return value_groups
            .iter()
            .filter(|g| !g.trim().is_empty())
            .any(|g| components_match(pattern_groups[0], g, case_insensitive, fuzzy));
    }
    pattern_groups.iter().enumerate().all(|(i, p)| {
        p.trim().is_empty()
            || components_match(
                p,
                value_groups.get(i).unwrap_or(&""),
                case_insensitive,
                fuzzy,
            )
    })
}

fn components_match(pattern: &str, value: &str, case_insensitive: bool, fuzzy: bool) -> bool {
    let values: Vec<&str> = value.split('^').collect();
    pattern.split('^').enumerate().all(|(i, p)| {
        let p = p.trim();
        if p.is_empty() || p.chars().all(|c| c == '*') {
            return true;
        }
        let v = values.get(i).map(|v| v.trim()).unwrap_or("");
        if fuzzy {
            wildcard_match(&format!("{p}*"), v, true)
        } else {
            wildcard_match(p, v, case_insensitive)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        let cases = [
            ("*", "", true),
            ("A*", "ABC", true),
            ("A?C", "ABC", true),
            ("A?C", "AC", false),
            ("*B*", "ABC", true),
            ("*B", "ABC", false),
            ("a*", "ABC", false),
            ("王*", "王小明", true),
            ("*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false),
        ];
        for (p, v, want) in cases {
            assert_eq!(wildcard_match(p, v, false), want, "{p} vs {v}");
        }
        assert!(wildcard_match("a*", "ABC", true));
    }

    #[test]
    fn names() {
        let stored = "Wang^Xiaoming=王^小明=wang^xiao ming";
        let cases = [
            ("WANG", true, false, true),
            ("WANG", false, false, false),
            ("Wang", false, false, true),
            ("wang^xiao*", true, false, true),
            ("^Xiaoming", true, false, true),
            ("王*", true, false, true),
            ("王^小明", true, false, true),
            ("=王^小明", true, false, true),
            ("=李*", true, false, false),
            ("Li*", true, false, false),
            ("*ming*", true, false, true),
            ("wa^xiao", true, true, true),
            ("wa^xiao", true, false, false),
        ];
        for (p, ci, fuzzy, want) in cases {
            assert_eq!(
                name_matches(p, stored, ci, fuzzy),
                want,
                "{p} ci={ci} fuzzy={fuzzy}"
            );
        }
    }
}
