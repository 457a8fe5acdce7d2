//! Closed objects by default: an object schema that lists its `properties` and says nothing of
//! others gets `additionalProperties: false`, as OpenAI's strict mode requires and vLLM's
//! default grammar backend assumes. Without it a grammar lets the model invent keys, which a
//! weak model does until `max_tokens`, and a caller that listed the keys never wants.

use serde_json::Value;

/// Keywords whose value is one schema.
const ONE: [&str; 9] = [
    "items",
    "additionalProperties",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "additionalItems",
];
/// Keywords whose value is a list of schemas.
const LIST: [&str; 5] = ["anyOf", "allOf", "oneOf", "prefixItems", "items"];
/// Keywords whose value maps names to schemas.
const MAP: [&str; 4] = ["properties", "$defs", "definitions", "patternProperties"];

/// `schema` with every object that lists properties closed unless it says otherwise.
pub fn closed_objects(mut schema: Value) -> Value {
    close(&mut schema);
    schema
}

fn close(schema: &mut Value) {
    let Value::Object(o) = schema else {
        return;
    };
    let open_keys = [
        "additionalProperties",
        "patternProperties",
        "unevaluatedProperties",
    ];
    if o.contains_key("properties") && !open_keys.iter().any(|k| o.contains_key(*k)) {
        o.insert("additionalProperties".into(), Value::Bool(false));
    }
    for (k, v) in o.iter_mut() {
        let k = k.as_str();
        if MAP.contains(&k) {
            if let Value::Object(m) = v {
                m.values_mut().for_each(close);
            }
        } else if LIST.contains(&k) && v.is_array() {
            if let Value::Array(a) = v {
                a.iter_mut().for_each(close);
            }
        } else if ONE.contains(&k) {
            close(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn listed_properties_close_the_object_at_every_depth() {
        let s = closed_objects(json!({
            "type": "object",
            "properties": {
                "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                "properties": {"type": "string"},
                "list": {"type": "array", "items": {"properties": {"c": {}}}},
                "either": {"anyOf": [{"properties": {"d": {}}}, {"type": "null"}]}
            },
            "$defs": {"t": {"properties": {"e": {}}}}
        }));
        assert_eq!(s["additionalProperties"], json!(false));
        assert_eq!(s["properties"]["a"]["additionalProperties"], json!(false));
        assert_eq!(
            s["properties"]["list"]["items"]["additionalProperties"],
            json!(false)
        );
        assert_eq!(
            s["properties"]["either"]["anyOf"][0]["additionalProperties"],
            json!(false)
        );
        assert_eq!(s["$defs"]["t"]["additionalProperties"], json!(false));
        // A property named "properties" is a property, not a keyword.
        assert!(s["properties"].get("additionalProperties").is_none());
        assert!(s["properties"]["properties"]
            .get("additionalProperties")
            .is_none());
    }

    #[test]
    fn what_the_schema_says_stands() {
        for keep in [
            json!({"type": "object"}),
            json!({"properties": {"a": {}}, "additionalProperties": true}),
            json!({"properties": {"a": {}}, "additionalProperties": {"type": "integer"}}),
            json!({"properties": {"a": {}}, "patternProperties": {"^x": {}}}),
            json!(true),
        ] {
            assert_eq!(closed_objects(keep.clone()), keep);
        }
    }
}
