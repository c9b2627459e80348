//! Label and field selectors with the API server's grammar and matching rules (pure).
//!
//! Labels: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`, `k>1`, `k<1`,
//! joined by commas. `!=` and `notin` also match objects without the key.
//! Fields: `path=v`, `path==v`, `path!=v` over `metadata.name`, `metadata.namespace` and
//! the type's own labels (see `ResourceType::field_labels`).

use std::collections::BTreeSet;

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelOp {
    Equals(String),
    NotEquals(String),
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
    GreaterThan(i64),
    LessThan(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelRequirement {
    pub key: String,
    pub op: LabelOp,
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(pub Vec<LabelRequirement>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    Not,
    Eq,
    DoubleEq,
    NotEq,
    Gt,
    Lt,
    Open,
    Close,
    Comma,
}

fn tokenize(input: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut chars = input.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {}
            ',' => tokens.push(Token::Comma),
            '(' => tokens.push(Token::Open),
            ')' => tokens.push(Token::Close),
            '>' => tokens.push(Token::Gt),
            '<' => tokens.push(Token::Lt),
            '=' if chars.peek() == Some(&'=') => {
                chars.next();
                tokens.push(Token::DoubleEq);
            }
            '=' => tokens.push(Token::Eq),
            '!' if chars.peek() == Some(&'=') => {
                chars.next();
                tokens.push(Token::NotEq);
            }
            '!' => tokens.push(Token::Not),
            c => {
                let mut ident = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_whitespace() || ",()<>=!".contains(n) {
                        break;
                    }
                    ident.push(n);
                    chars.next();
                }
                tokens.push(Token::Ident(ident));
            }
        }
    }
    tokens
}

impl LabelSelector {
    pub fn parse(input: &str) -> Result<Self, String> {
        let tokens = tokenize(input);
        let mut pos = 0;
        let mut reqs = Vec::new();
        if tokens.is_empty() {
            return Ok(Self(reqs));
        }
        loop {
            reqs.push(parse_requirement(&tokens, &mut pos)?);
            match tokens.get(pos) {
                None => break,
                Some(Token::Comma) => pos += 1,
                Some(t) => return Err(format!("found '{t:?}', expected: ',' or end of string")),
            }
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, labels: Option<&Value>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|req| {
            let value = get(&req.key);
            match &req.op {
                LabelOp::Equals(v) => value == Some(v.as_str()),
                LabelOp::NotEquals(v) => value != Some(v.as_str()),
                LabelOp::In(set) => value.is_some_and(|x| set.contains(x)),
                LabelOp::NotIn(set) => !value.is_some_and(|x| set.contains(x)),
                LabelOp::Exists => value.is_some(),
                LabelOp::DoesNotExist => value.is_none(),
                LabelOp::GreaterThan(n) => value
                    .and_then(|x| x.parse::<i64>().ok())
                    .is_some_and(|x| x > *n),
                LabelOp::LessThan(n) => value
                    .and_then(|x| x.parse::<i64>().ok())
                    .is_some_and(|x| x < *n),
            }
        })
    }
}

fn parse_requirement(tokens: &[Token], pos: &mut usize) -> Result<LabelRequirement, String> {
    let next = |pos: &mut usize| {
        let t = tokens.get(*pos).cloned();
        *pos += 1;
        t
    };
    let negated = tokens.get(*pos) == Some(&Token::Not);
    if negated {
        *pos += 1;
    }
    let key = match next(pos) {
        Some(Token::Ident(k)) => k,
        other => {
            return Err(format!(
                "unable to parse requirement: found '{other:?}', expected: identifier"
            ));
        }
    };
    validate_key(&key)?;
    if negated {
        return Ok(LabelRequirement {
            key,
            op: LabelOp::DoesNotExist,
        });
    }
    let op = match tokens.get(*pos) {
        None | Some(Token::Comma) => {
            return Ok(LabelRequirement {
                key,
                op: LabelOp::Exists,
            });
        }
        Some(_) => next(pos),
    };
    let single_value = |pos: &mut usize| -> Result<String, String> {
        match tokens.get(*pos) {
            Some(Token::Ident(v)) => {
                *pos += 1;
                validate_value(v)?;
                Ok(v.clone())
            }
            None | Some(Token::Comma) => Ok(String::new()),
            Some(t) => Err(format!("found '{t:?}', expected: identifier")),
        }
    };
    let op = match op {
        Some(Token::Eq | Token::DoubleEq) => LabelOp::Equals(single_value(pos)?),
        Some(Token::NotEq) => LabelOp::NotEquals(single_value(pos)?),
        Some(t @ (Token::Gt | Token::Lt)) => {
            let v = single_value(pos)?;
            let n: i64 = v.parse().map_err(|_| {
                format!("for 'Gt', 'Lt' operators, the value must be an integer: {v:?}")
            })?;
            if t == Token::Gt {
                LabelOp::GreaterThan(n)
            } else {
                LabelOp::LessThan(n)
            }
        }
        Some(Token::Ident(word)) if word == "in" || word == "notin" => {
            if next(pos) != Some(Token::Open) {
                return Err("expected '(' after set operator".into());
            }
            let mut set = BTreeSet::new();
            loop {
                match next(pos) {
                    Some(Token::Ident(v)) => {
                        validate_value(&v)?;
                        set.insert(v);
                    }
                    Some(Token::Comma) => {}
                    Some(Token::Close) => break,
                    other => return Err(format!("found '{other:?}', expected: ',' or ')'")),
                }
            }
            if set.is_empty() {
                return Err("for 'in', 'notin' operators, values set can't be empty".into());
            }
            if word == "in" {
                LabelOp::In(set)
            } else {
                LabelOp::NotIn(set)
            }
        }
        other => return Err(format!("found '{other:?}', expected: operator")),
    };
    Ok(LabelRequirement { key, op })
}

/// `[prefix/]name`: prefix a DNS subdomain, name a 63-character qualified name part.
pub fn validate_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix
        && !is_dns_subdomain(prefix)
    {
        return Err(format!(
            "invalid label key {key:?}: prefix part must be a lowercase RFC 1123 subdomain"
        ));
    }
    if name.is_empty() || !is_label_value(name) {
        return Err(format!(
            "invalid label key {key:?}: name part must consist of alphanumeric characters, '-', '_' or '.', \
             and must start and end with an alphanumeric character"
        ));
    }
    Ok(())
}

pub fn validate_value(value: &str) -> Result<(), String> {
    if is_label_value(value) {
        Ok(())
    } else {
        Err(format!(
            "invalid label value: {value:?}: a valid label must be an empty string or consist of alphanumeric \
             characters, '-', '_' or '.', and must start and end with an alphanumeric character"
        ))
    }
}

fn is_label_value(v: &str) -> bool {
    let ok_edge = |c: Option<char>| c.is_none_or(|c| c.is_ascii_alphanumeric());
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && ok_edge(v.chars().next())
        && ok_edge(v.chars().last())
}

/// RFC 1123 subdomain: object names of most types and label key prefixes.
pub fn is_dns_subdomain(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 253
        && v.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRequirement {
    pub field: String,
    pub value: String,
    pub equal: bool,
}

/// A parsed field selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(pub Vec<FieldRequirement>);

impl FieldSelector {
    /// Parses and checks every field against `supported` (`metadata.name` and
    /// `metadata.namespace` are always supported).
    pub fn parse(input: &str, supported: &[(&str, &str)]) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for term in split_unescaped(input, ',') {
            if term.trim().is_empty() {
                continue;
            }
            let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, true)
            } else {
                return Err(format!(
                    "invalid selector: '{input}'; can't understand '{term}'"
                ));
            };
            let field = field.trim().to_string();
            let known = field == "metadata.name"
                || field == "metadata.namespace"
                || supported.iter().any(|(f, _)| *f == field);
            if !known {
                return Err(format!("field label not supported: {field}"));
            }
            reqs.push(FieldRequirement {
                field,
                value: unescape(value.trim()),
                equal,
            });
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, obj: &Value, supported: &[(&str, &str)]) -> bool {
        self.0.iter().all(|req| {
            let default = supported
                .iter()
                .find(|(f, _)| *f == req.field)
                .map_or("", |(_, d)| *d);
            let actual = field_value(obj, &req.field).unwrap_or_else(|| default.to_string());
            (actual == req.value) == req.equal
        })
    }
}

fn field_value(obj: &Value, path: &str) -> Option<String> {
    let value = path.split('.').try_fold(obj, |v, part| v.get(part))?;
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn split_unescaped(input: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut escaped = false;
    for c in input.chars() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(String::new());
            continue;
        }
        if let Some(last) = parts.last_mut() {
            last.push(c);
        }
    }
    parts
}

fn unescape(v: &str) -> String {
    let mut out = String::new();
    let mut escaped = false;
    for c in v.chars() {
        if !escaped && c == '\\' {
            escaped = true;
            continue;
        }
        escaped = false;
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn matches(sel: &str, labels: Value) -> bool {
        LabelSelector::parse(sel).unwrap().matches(Some(&labels))
    }

    #[test]
    fn equality_operators() {
        let l = json!({"app": "web", "tier": "front"});
        assert!(matches("app=web", l.clone()));
        assert!(matches("app==web,tier=front", l.clone()));
        assert!(!matches("app=db", l.clone()));
        assert!(matches("app!=db", l.clone()));
        assert!(matches("missing!=x", l.clone()));
        assert!(!matches("app!=web", l));
    }

    #[test]
    fn set_based_operators() {
        let l = json!({"app": "web", "env": "prod"});
        assert!(matches("env in (prod, staging)", l.clone()));
        assert!(!matches("env in (dev)", l.clone()));
        assert!(matches("env notin (dev)", l.clone()));
        assert!(matches("zone notin (a)", l.clone()));
        assert!(matches("app", l.clone()));
        assert!(!matches("!app", l.clone()));
        assert!(matches("!zone,app in (web),env", l));
    }

    #[test]
    fn numeric_comparisons() {
        let l = json!({"replicas": "3"});
        assert!(matches("replicas>2", l.clone()));
        assert!(!matches("replicas<3", l));
    }

    #[test]
    fn empty_selector_matches_objects_without_labels() {
        assert!(LabelSelector::parse("").unwrap().matches(None));
        assert!(!LabelSelector::parse("app").unwrap().matches(None));
    }

    #[test]
    fn bad_selectors_are_rejected() {
        assert!(LabelSelector::parse("app in ()").is_err());
        assert!(LabelSelector::parse("app=web=x").is_err());
        assert!(LabelSelector::parse("-bad=x").is_err());
        assert!(LabelSelector::parse("app in (a").is_err());
        assert!(LabelSelector::parse("app=has space").is_err());
    }

    #[test]
    fn field_selectors_match_paths_with_defaults() {
        let fields = &[("spec.nodeName", ""), ("spec.hostNetwork", "false")];
        let pod = json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1"}});
        let parse = |s| FieldSelector::parse(s, fields).unwrap();
        assert!(parse("metadata.name=p,metadata.namespace==ns").matches(&pod, fields));
        assert!(parse("spec.nodeName=n1").matches(&pod, fields));
        assert!(!parse("spec.nodeName!=n1").matches(&pod, fields));
        assert!(parse("spec.hostNetwork=false").matches(&pod, fields));
        assert!(FieldSelector::parse("spec.other=x", fields).is_err());
    }
}
