//! proptest strategies for what registries and token servers send.

use proptest::prelude::*;
use serde_json::Value;

/// Any JSON value, a few levels deep: numbers of every kind (past `i64`, negative,
/// fractional), strings, arrays and objects.
pub(crate) fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,20}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `value`, or the same object with some of its fields replaced by any JSON.
pub(crate) fn with_any_fields(
    value: Value,
    fields: &'static [&'static str],
) -> impl Strategy<Value = Value> {
    prop::collection::vec((prop::sample::select(fields), json_value()), 0..3).prop_map(
        move |changes| {
            let mut value = value.clone();
            if let Some(object) = value.as_object_mut() {
                for (field, replacement) in changes {
                    object.insert(field.to_owned(), replacement);
                }
            }
            value
        },
    )
}
