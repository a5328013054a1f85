//! Maps between places in a TOML document and key paths such as `routes[1].prefix`, so
//! every config error can name both the line and the key.

use toml::{
    Spanned,
    de::{DeTable, DeValue},
};

pub struct Document<'a> {
    text: &'a str,
    root: Option<Spanned<DeTable<'a>>>,
}

impl<'a> Document<'a> {
    pub fn parse(text: &'a str) -> Self {
        Self {
            text,
            root: DeTable::parse(text).ok(),
        }
    }

    /// 1-based line of a byte offset.
    pub fn line_of_offset(&self, offset: usize) -> usize {
        self.text.as_bytes()[..offset.min(self.text.len())]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    /// The innermost key whose key or value covers `offset`.
    pub fn key_at(&self, offset: usize) -> Option<String> {
        let root = self.root.as_ref()?;
        key_in_table(root.get_ref(), offset, String::new())
    }

    /// The line where `path` is set, or where its nearest parent is.
    pub fn line_of_key(&self, path: &str) -> Option<usize> {
        let root = self.root.as_ref()?;
        let mut span = None;
        let mut table = Some(root.get_ref());
        for part in path.split('.') {
            let (name, index) = match part.split_once('[') {
                Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
                None => (part, None),
            };
            let Some((key, found)) =
                table.and_then(|t| t.iter().find(|(k, _)| k.get_ref() == name))
            else {
                break;
            };
            span = Some(key.span());
            let mut value = found.get_ref();
            if let (Some(i), DeValue::Array(items)) = (index, value)
                && let Some(item) = items.get(i)
            {
                span = Some(item.span());
                value = item.get_ref();
            }
            table = match value {
                DeValue::Table(t) => Some(t),
                _ => None,
            };
        }
        span.map(|s| self.line_of_offset(s.start))
    }
}

fn key_in_table(table: &DeTable, offset: usize, prefix: String) -> Option<String> {
    for (key, value) in table.iter() {
        let here = join(&prefix, key.get_ref());
        let covers = |r: std::ops::Range<usize>| r.contains(&offset);
        if let Some(inner) = key_in_value(value, offset, &here) {
            return Some(inner);
        }
        if covers(key.span()) || covers(value.span()) {
            return Some(here);
        }
    }
    None
}

fn key_in_value(value: &Spanned<DeValue>, offset: usize, here: &str) -> Option<String> {
    match value.get_ref() {
        DeValue::Table(t) => key_in_table(t, offset, here.to_string()),
        DeValue::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let indexed = format!("{here}[{i}]");
            key_in_value(item, offset, &indexed)
                .or_else(|| item.span().contains(&offset).then_some(indexed))
        }),
        _ => None,
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str =
        "[proxy]\nlisten = \"x\"\n\n[[routes]]\nprefix = \"/a/\"\n\n[[routes]]\nprefix = \"/b/\"\n";

    #[test]
    fn finds_lines_of_keys() {
        let doc = Document::parse(TEXT);
        assert_eq!(doc.line_of_key("proxy.listen"), Some(2));
        assert_eq!(doc.line_of_key("routes[1].prefix"), Some(8));
        assert_eq!(doc.line_of_key("routes[0].prefix"), Some(5));
    }

    #[test]
    fn finds_keys_at_offsets() {
        let doc = Document::parse(TEXT);
        let offset = TEXT.find("\"/b/\"").unwrap();
        assert_eq!(doc.key_at(offset).as_deref(), Some("routes[1].prefix"));
        assert_eq!(
            doc.key_at(TEXT.find("listen").unwrap()).as_deref(),
            Some("proxy.listen")
        );
    }
}
