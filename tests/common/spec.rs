//! The OpenAPI spec, as JSON, and a validator for the subset of JSON Schema it uses:
//! `$ref`, `type`, `nullable`, `enum`, `format: date-time`, `required`, `properties`,
//! `additionalProperties: false`, `items`, `oneOf`.
use serde_json::Value;
use std::sync::OnceLock;

/// YAML -> JSON with PyYAML (python3-yaml), as no maintained YAML crate is a
/// dependency; the conversion is all it does.
fn spec() -> &'static Value {
    static SPEC: OnceLock<Value> = OnceLock::new();
    SPEC.get_or_init(|| {
        let path = super::repo().join("schemas/openapi.yaml");
        let out = std::process::Command::new("python3")
            .args(["-c", "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout, default=str)"])
            .arg(&path)
            .output()
            .expect("python3 runs (the OpenAPI check needs python3 with PyYAML: apt-get install python3-yaml)");
        assert!(out.status.success(), "openapi.yaml -> JSON: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("JSON from the converter")
    })
}

/// The spec's path template matching a concrete path (exact segments win).
fn template(path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    let segs: Vec<&str> = path.split('/').collect();
    let paths = spec()["paths"].as_object().unwrap();
    let mut best: Option<(usize, &String)> = None;
    for t in paths.keys() {
        let tsegs: Vec<&str> = t.split('/').collect();
        if tsegs.len() != segs.len() {
            continue;
        }
        let fits = tsegs.iter().zip(&segs).all(|(t, s)| t == s || (t.starts_with('{') && t.ends_with('}')));
        let exact = tsegs.iter().zip(&segs).filter(|(t, s)| t == s).count();
        if fits && best.is_none_or(|(e, _)| exact > e) {
            best = Some((exact, t));
        }
    }
    best.map(|(_, t)| t.clone()).unwrap_or_else(|| panic!("no path of the spec matches {path}"))
}

fn resolve(v: &Value) -> &Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let pointer = r.strip_prefix('#').expect("local $ref");
            resolve(spec().pointer(pointer).unwrap_or_else(|| panic!("dangling $ref {r}")))
        }
        None => v,
    }
}

/// The response `body` of `method path` with `status` must be documented and match.
pub fn check_response(method: &str, path: &str, status: u16, body: &Value) {
    let t = template(path);
    let op = &spec()["paths"][&t][method.to_ascii_lowercase()];
    assert!(op.is_object(), "{method} {t} is not in the spec");
    let resp = op["responses"]
        .get(status.to_string())
        .unwrap_or_else(|| panic!("{method} {t}: status {status} is not documented (body {body})"));
    let schema = &resolve(resp)["content"]["application/json"]["schema"];
    assert!(!schema.is_null(), "{method} {t} {status}: no JSON schema");
    if let Err(e) = validate(schema, body, "$") {
        panic!("{method} {path} -> {status}: body does not match the spec: {e}\nbody: {body}");
    }
}

fn validate(schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(schema);
    if v.is_null() {
        let nullable = schema["nullable"].as_bool() == Some(true);
        return if nullable || schema.get("type").is_none() && schema.get("oneOf").is_none() {
            Ok(())
        } else {
            Err(format!("{at}: null where not nullable"))
        };
    }
    if let Some(options) = schema["oneOf"].as_array() {
        let fits = options.iter().filter(|o| validate(o, v, at).is_ok()).count();
        return if fits == 1 { Ok(()) } else { Err(format!("{at}: matches {fits} of oneOf")) };
    }
    if let Some(t) = schema["type"].as_str() {
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            other => return Err(format!("{at}: validator lacks type {other}")),
        };
        if !ok {
            return Err(format!("{at}: expected {t}, got {v}"));
        }
    }
    if let Some(values) = schema["enum"].as_array()
        && !values.contains(v)
    {
        return Err(format!("{at}: {v} not in enum {values:?}"));
    }
    if schema["format"] == "date-time" {
        let s = v.as_str().unwrap_or_default();
        chrono::DateTime::parse_from_rfc3339(s).map_err(|e| format!("{at}: not a date-time ({e}): {s}"))?;
    }
    if let Some(obj) = v.as_object() {
        for r in schema["required"].as_array().into_iter().flatten() {
            let r = r.as_str().unwrap();
            if !obj.contains_key(r) {
                return Err(format!("{at}: missing required {r}"));
            }
        }
        let props = schema["properties"].as_object();
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(s, val, &format!("{at}.{k}"))?,
                None if schema["additionalProperties"] == Value::Bool(false) => {
                    return Err(format!("{at}: property {k} is not in the spec"));
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, item) in arr.iter().enumerate() {
            validate(items, item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

#[test]
fn the_validator_catches_mismatches() {
    let err = serde_json::json!({"error": {"code": "x", "message": "m"}});
    check_response("GET", "/v1/accounts/a/transactions", 404, &err);
    let schema = serde_json::json!({"$ref": "#/components/schemas/Error"});
    assert!(validate(&schema, &serde_json::json!({"error": {"code": "x"}}), "$").is_err());
    assert!(validate(&schema, &serde_json::json!({"error": {"code": 1, "message": "m"}}), "$").is_err());
    assert!(
        validate(&schema, &serde_json::json!({"error": {"code": "x", "message": "m"}, "x": 1}), "$").is_err()
    );
    let tx = serde_json::json!({"$ref": "#/components/schemas/TransactionPage"});
    let page = |transactions: serde_json::Value| serde_json::json!({"display_unit": "USD", "transactions": transactions, "next_before": null});
    assert!(validate(&tx, &page(serde_json::json!([])), "$").is_ok());
    assert!(validate(&tx, &page(serde_json::json!([{"entry_id": 1}])), "$").is_err());
    assert!(validate(&tx, &serde_json::json!({"transactions": [], "next_before": null}), "$").is_err());
    assert_eq!(template("/v1/deductions/batch"), "/v1/deductions/batch");
    assert_eq!(template("/v1/reservations/batch/settle"), "/v1/reservations/{id}/settle");
}
