//! Refuses a key written twice in one YAML mapping.
//!
//! serde_yaml keeps the last of two equal keys in a map without a word, so
//! two `ssh:` doors become one, and if the survivor moved to another port,
//! the first door's port is no longer guarded. Strict YAML means such a
//! file is refused, and the operator needs both lines to see which copy is
//! stale. serde_yaml reports no position for a key, so this pass reads the
//! events of yaml-rust2's parser, which carry one. It only looks for
//! duplicates: a text it cannot parse is left to serde_yaml, which says why.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};

/// A key written twice in one mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    /// The key's dotted path (`doors.ssh`).
    pub key: String,
    /// The lines of its first and second occurrences (1-based).
    pub first: usize,
    pub second: usize,
}

impl Duplicate {
    /// What a reader of the file needs: both lines, and why it matters.
    pub fn message(&self) -> String {
        format!(
            "written twice in one mapping, on lines {} and {}; YAML would keep only the \
             second without a word, so remove or rename one",
            self.first, self.second
        )
    }
}

enum Frame {
    Map {
        path: String,
        /// Each scalar key seen so far, with its line.
        keys: HashMap<String, usize>,
        /// The key whose value comes next; `None` when a key comes next.
        key: Option<String>,
    },
    Seq {
        path: String,
        next: usize,
    },
}

/// Where a node that starts now sits: its path, or `None` when it is a
/// mapping's key.
fn place(stack: &[Frame]) -> Option<String> {
    match stack.last() {
        None => Some(String::new()),
        Some(Frame::Map { key: None, .. }) => None,
        Some(Frame::Map {
            path,
            key: Some(key),
            ..
        }) => Some(join(path, key)),
        Some(Frame::Seq { path, next }) => Some(format!("{path}[{next}]")),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// A node has ended: its parent moves on to its next key, value or item.
/// A complex (non-scalar) key takes part in no comparison.
fn done(stack: &mut [Frame]) {
    match stack.last_mut() {
        Some(Frame::Map { key, .. }) => {
            *key = match key {
                None => Some("?".to_owned()),
                Some(_) => None,
            }
        }
        Some(Frame::Seq { next, .. }) => *next += 1,
        None => {}
    }
}

/// The first key written twice in one mapping of `text` (any of its
/// documents), if any.
pub fn first(text: &str) -> Option<Duplicate> {
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    loop {
        let Ok((event, mark)) = parser.next_token() else {
            return None;
        };
        match event {
            Event::StreamEnd => return None,
            Event::DocumentStart => stack.clear(),
            Event::Scalar(value, ..) => {
                if let Some(Frame::Map {
                    path,
                    keys,
                    key: key @ None,
                }) = stack.last_mut()
                {
                    if let Some(&first) = keys.get(&value) {
                        return Some(Duplicate {
                            key: join(path, &value),
                            first,
                            second: mark.line(),
                        });
                    }
                    keys.insert(value.clone(), mark.line());
                    *key = Some(value);
                } else {
                    done(&mut stack);
                }
            }
            Event::Alias(_) => done(&mut stack),
            Event::MappingStart(..) => {
                let path = place(&stack).unwrap_or_else(|| "?".to_owned());
                stack.push(Frame::Map {
                    path,
                    keys: HashMap::new(),
                    key: None,
                });
            }
            Event::SequenceStart(..) => {
                let path = place(&stack).unwrap_or_else(|| "?".to_owned());
                stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
                done(&mut stack);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_door_written_twice_is_found_with_both_lines() {
        let text = "interfaces: [eth0]\ndoors:\n  ssh: { service_port: 22 }\n  web:\n    service_port: 443\n  ssh:\n    service_port: 2222\n";
        assert_eq!(
            first(text),
            Some(Duplicate {
                key: "doors.ssh".into(),
                first: 3,
                second: 6
            })
        );
    }

    #[test]
    fn flow_mappings_sequences_and_later_documents_are_walked() {
        assert_eq!(
            first("devices: { a: { groups: [x, y], groups: [z] } }").map(|d| d.key),
            Some("devices.a.groups".into())
        );
        assert_eq!(
            first("list:\n  - { k: 1 }\n  - { k: 1, k: 2 }\n").map(|d| d.key),
            Some("list[1].k".into())
        );
        let d =
            first("profiles: { a: 1 }\n---\nprofiles: { a: 1 }\nversion: 1\nversion: 1\n").unwrap();
        assert_eq!((d.key.as_str(), d.first, d.second), ("version", 4, 5));
    }

    #[test]
    fn equal_keys_in_different_mappings_and_unparsable_text_pass() {
        assert_eq!(
            first("doors: { ssh: { allow: { groups: [a] } }, web: { allow: { groups: [a] } } }"),
            None
        );
        assert_eq!(first("a: [1, 2\nb: {"), None);
        assert_eq!(
            first("? [complex, key]\n: 1\n? [complex, key]\n: 2\n"),
            None
        );
    }
}
