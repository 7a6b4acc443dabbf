//! Peeks at operator state by name, for introspection: the state that [`per_minute`] keeps
//! (de-duplication, the per-minute counts, the local top K) registers itself here, on the
//! worker that builds it, and a peek on that worker reads the rows whose key begins with the
//! fields it is given.
//!
//! [`per_minute`]: super::minute_state::per_minute

use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::rc::Rc;

use serde_json::Value;

/// One scalar of a key, ordered as a person expects: integers (exact, whatever their size) and
/// other numbers by value, text by its bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Field {
    Integer(i128),
    Number(f64),
    Text(String),
}

impl Eq for Field {}

impl Ord for Field {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Field::Integer(a), Field::Integer(b)) => a.cmp(b),
            (Field::Number(a), Field::Number(b)) => a.total_cmp(b),
            (Field::Text(a), Field::Text(b)) => a.cmp(b),
            // One position of a key holds one type; across types, by kind.
            (a, b) => a.kind().cmp(&b.kind()),
        }
    }
}

impl PartialOrd for Field {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Field {
    fn kind(&self) -> u8 {
        match self {
            Field::Integer(_) => 0,
            Field::Number(_) => 1,
            Field::Text(_) => 2,
        }
    }

    /// Whether `text`, as a person typed it, names this field.
    fn matches(&self, text: &str) -> bool {
        match self {
            Field::Integer(n) => text.parse::<i128>().is_ok_and(|t| t == *n),
            Field::Number(n) => text.parse::<f64>().is_ok_and(|t| t == *n),
            Field::Text(s) => s == text,
        }
    }
}

use serde::{Deserialize, Serialize};

/// The scalars of `value` in order, depth first (a tuple's fields, a struct's fields).
pub fn fields(value: &Value, out: &mut Vec<Field>) {
    match value {
        Value::Null => out.push(Field::Text("null".into())),
        Value::Bool(b) => out.push(Field::Text(b.to_string())),
        Value::Number(n) => out.push(match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Field::Integer(u as i128),
            (None, Some(i)) => Field::Integer(i as i128),
            (None, None) => Field::Number(n.as_f64().unwrap_or(f64::NAN)),
        }),
        Value::String(s) => out.push(Field::Text(s.clone())),
        Value::Array(items) => items.iter().for_each(|v| fields(v, out)),
        Value::Object(map) => map.values().for_each(|v| fields(v, out)),
    }
}

/// One row a peek found: its key's fields and then its value's (the order rows are given in),
/// the key and value as JSON text, and its multiplicity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StateRow {
    pub order: Vec<Field>,
    pub value_order: Vec<Field>,
    pub key: String,
    pub value: String,
    pub count: isize,
}

/// The first rows, in key order, whose key begins with some fields: at most `limit + 1`, so
/// that the reader knows whether there are more.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRows {
    pub rows: Vec<StateRow>,
    /// Whether any worker holds state by this name.
    pub found: bool,
    /// Why state registered under this name could not be read on some worker (its trace was
    /// dropped), if it could not: the rows are then not the whole answer.
    pub unreadable: Option<String>,
}

impl StateRows {
    /// Adds another worker's rows, keeping the first `limit + 1`.
    pub fn merge(&mut self, part: StateRows, limit: usize) {
        self.found |= part.found;
        if self.unreadable.is_none() {
            self.unreadable = part.unreadable;
        }
        self.rows.extend(part.rows);
        self.rows.sort();
        self.rows.truncate(limit.saturating_add(1));
    }
}

/// Keeps the least `limit + 1` rows offered, in a heap bounded to that size.
pub struct FirstRows {
    prefix: Vec<String>,
    limit: usize,
    heap: BinaryHeap<StateRow>,
}

impl FirstRows {
    pub fn new(prefix: &[String], limit: usize) -> Self {
        FirstRows { prefix: prefix.to_vec(), limit: limit.saturating_add(1), heap: BinaryHeap::new() }
    }

    /// The fields asked for, if any.
    pub fn prefix(&self) -> &[String] {
        &self.prefix
    }

    /// Whether keys that begin with `minute` may begin with the prefix, for state keyed by
    /// minute first: it need not offer a minute the prefix rules out.
    pub fn may_hold(&self, minute: crate::types::Minute) -> bool {
        self.prefix.first().is_none_or(|first| Field::Integer(minute as i128).matches(first))
    }

    /// The fields of `key` if it begins with the prefix and may still be among the first rows.
    fn key_fields(&self, key: &impl Serialize) -> Option<(Value, Vec<Field>)> {
        let key = serde_json::to_value(key).ok()?;
        let mut order = Vec::new();
        fields(&key, &mut order);
        if order.len() < self.prefix.len() || !order.iter().zip(&self.prefix).all(|(f, t)| f.matches(t)) {
            return None;
        }
        if self.heap.len() >= self.limit && self.heap.peek().is_some_and(|last| last.order < order) {
            return None;
        }
        Some((key, order))
    }

    /// Whether rows with `key` may be kept: it begins with the prefix, and does not come after
    /// every row kept when there are enough. A reader may skip a key's values when not.
    pub fn key_may_match(&self, key: &impl Serialize) -> bool {
        self.key_fields(key).is_some()
    }

    /// Offers one row; kept if its key begins with the prefix and it is among the first (by key
    /// fields, then value fields).
    pub fn offer(&mut self, key: &impl Serialize, value: &impl Serialize, count: isize) {
        let Some((key, order)) = self.key_fields(key) else { return };
        let Ok(value) = serde_json::to_value(value) else { return };
        let mut value_order = Vec::new();
        fields(&value, &mut value_order);
        if self.heap.len() >= self.limit && self.heap.peek().is_some_and(|last| (&last.order, &last.value_order) <= (&order, &value_order)) {
            return;
        }
        self.heap.push(StateRow { order, value_order, key: key.to_string(), value: value.to_string(), count });
        if self.heap.len() > self.limit {
            self.heap.pop();
        }
    }

    pub fn finish(self) -> Vec<StateRow> {
        self.heap.into_sorted_vec()
    }
}

/// State that can be peeked at.
pub trait Peekable {
    /// Offers every row held whose key may begin with `rows.prefix()` to `rows`, or says why
    /// the state can no longer be read.
    fn peek(&self, rows: &mut FirstRows) -> Result<(), String>;
}

thread_local! {
    /// This worker's peekable state, by operator name.
    static REGISTRY: RefCell<Vec<(String, Rc<dyn Peekable>)>> = const { RefCell::new(Vec::new()) };
}

/// Makes `state` peekable under `name` on this worker (thread).
pub fn register(name: &str, state: Rc<dyn Peekable>) {
    REGISTRY.with(|r| r.borrow_mut().push((name.to_string(), state)));
}

/// The names this worker can peek at.
pub fn names() -> Vec<String> {
    REGISTRY.with(|r| r.borrow().iter().map(|(n, _)| n.clone()).collect())
}

/// The first `limit + 1` rows of the state named `name` on this worker whose key begins with
/// the fields `prefix`.
pub fn peek(name: &str, prefix: &[String], limit: usize) -> StateRows {
    let mut rows = FirstRows::new(prefix, limit);
    let (mut found, mut unreadable) = (false, None);
    REGISTRY.with(|r| {
        for (_, state) in r.borrow().iter().filter(|(n, _)| n == name) {
            found = true;
            if let Err(why) = state.peek(&mut rows) {
                unreadable = Some(why);
            }
        }
    });
    StateRows { rows: rows.finish(), found, unreadable }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_rows_that_begin_with_the_prefix_in_key_order() {
        let mut rows = FirstRows::new(&["7".to_string()], 2);
        for ad in [30u64, 4, u64::MAX, u64::MAX - 1, 9, 2] {
            rows.offer(&(7u32, ad), &(), 1);
            rows.offer(&(8u32, ad), &(), 1);
        }
        let keys: Vec<String> = rows.finish().into_iter().map(|r| r.key).collect();
        assert_eq!(keys, ["[7,2]", "[7,4]", "[7,9]"]);
        let mut rows = FirstRows::new(&["7".to_string(), u64::MAX.to_string()], 5);
        rows.offer(&(7u32, u64::MAX - 1), &(), 1);
        rows.offer(&(7u32, u64::MAX), &(), 3);
        let found: Vec<(String, isize)> = rows.finish().into_iter().map(|r| (r.key, r.count)).collect();
        assert_eq!(found, [(format!("[7,{}]", u64::MAX), 3)]);
        let mut merged = StateRows::default();
        merged.merge(StateRows { rows: FirstRows::new(&[], 1).finish(), found: true, unreadable: None }, 1);
        assert!(merged.found && merged.rows.is_empty());
    }
}
