//! Writer schemas by id (issue 13): compiled in, from a schema directory, or from a
//! Confluent-compatible schema registry; each checked once against Tally's reader schema.
//!
//! * **Compiled in:** id 1, `schemas/avro/usage_event.v1.avsc` (also the reader schema).
//! * **Directory** (`tally run --schema-dir DIR`, `TALLY_SCHEMA_DIR`): every `*.avsc` file
//!   whose top-level object carries its id as `"tally.schema_id": N` (an extra attribute,
//!   which Avro ignores). Read at start; a file that cannot be read or parsed is an error at
//!   start, not a silent gap.
//! * **Registry** (`TALLY_SCHEMA_REGISTRY_URL`): the registry's documented
//!   `GET /schemas/ids/{id}` -> `{"schema": "<the schema as a JSON string>"}`, asked the
//!   first time an id is seen, then cached. 404 means the id does not exist (its events are
//!   dead-lettered `unknown_schema`); any other failure (connection refused, timeout, 5xx) is
//!   an outage and is retried with backoff for as long as it lasts: the batch waits, nothing
//!   is dead-lettered or lost.
//!
//! **Resolution, once per id.** A writer schema is checked with Avro's schema resolution
//! rules against the reader (`apache_avro::schema_compatibility`, BACKWARD: can the reader
//! read what this writer wrote?). A compatible writer gets a datum reader built once; its
//! events then decode by field name (see `codec`). An incompatible one is remembered with
//! the reason, naming the field, and every event written with it is dead-lettered
//! `incompatible_schema` with that reason. No schema work happens per event.
//!
//! **Bounded.** At most [`SCHEMAS_MAX`] ids are held (each parsed schema lives as long as the
//! process: the datum readers borrow it). An id beyond that is dead-lettered
//! `unknown_schema` with the reason, so a producer spraying ids cannot grow memory.

use super::{DecodeError, SCHEMA_V1, USAGE_EVENT_V1_ID, decode_body, err, frame_schema_id};
use crate::event::RawUsageEvent;
use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema_compatibility::SchemaCompatibility;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

/// Most writer schema ids held at once.
pub const SCHEMAS_MAX: usize = 256;
/// The attribute of a schema file that carries its id.
pub const ID_ATTRIBUTE: &str = "tally.schema_id";
/// How long one registry request may take.
const REGISTRY_TIMEOUT: Duration = Duration::from_secs(5);
/// Backoff between registry attempts during an outage: 100 ms doubling to 5 s.
const RETRY_DELAY_MIN: Duration = Duration::from_millis(100);
const RETRY_DELAY_MAX: Duration = Duration::from_secs(5);

/// One writer schema and what reading its events takes.
pub struct Writer {
    pub id: u32,
    /// Where it came from: `compiled`, a file path, or `registry`.
    pub source: String,
    /// The schema's record name and field count, for listings.
    pub summary: String,
    /// `Ok`: the reader built once for it; `Err`: why Tally cannot read it (names the field).
    reader: Result<GenericDatumReader<'static>, String>,
    /// The writer schema is the reader schema: an unknown field is a shape error.
    exact: bool,
}

impl Writer {
    /// Check `schema` against the reader and build its datum reader (once per id).
    fn new(id: u32, source: String, schema: Schema) -> Writer {
        let summary = summary(&schema);
        let exact = schema.canonical_form() == SCHEMA_V1.canonical_form();
        // Lives as long as the process: at most SCHEMAS_MAX of them (see the module doc).
        let schema: &'static Schema = Box::leak(Box::new(schema));
        let reader = check(schema).and_then(|()| {
            GenericDatumReader::builder(schema).build().map_err(|e| format!("schema {id}: {e}"))
        });
        Writer { id, source, summary, reader, exact }
    }

    /// Why Tally cannot read this schema, if it cannot.
    pub fn incompatible(&self) -> Option<&str> {
        self.reader.as_ref().err().map(String::as_str)
    }
}

/// Whether Tally's reader can read what `writer` wrote (BACKWARD compatibility), with the
/// reason naming the field when it cannot. Also used by `tally schema check`.
pub fn check(writer: &Schema) -> Result<(), String> {
    SchemaCompatibility::can_read(writer, &SCHEMA_V1).map_err(|e| describe(&e))?;
    // Resolution accepts any long for occurred_at; only microseconds (or a plain long, taken
    // as microseconds) mean what the reader means.
    if let Schema::Record(r) = writer
        && let Some(f) = r.fields.iter().find(|f| f.name == "occurred_at")
        && !matches!(f.schema, Schema::TimestampMicros | Schema::Long)
    {
        return Err(format!(
            "field 'occurred_at' must be a long with logicalType timestamp-micros, not {:?}",
            f.schema
        ));
    }
    Ok(())
}

/// The compatibility error with its chain of causes (the field first).
fn describe(e: &apache_avro::error::CompatibilityError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn summary(schema: &Schema) -> String {
    match schema {
        Schema::Record(r) => format!("record {} ({} fields)", r.name.fullname(None), r.fields.len()),
        other => format!("{other:?}").chars().take(60).collect(),
    }
}

/// Parse a schema file's text: the schema and the id it carries.
pub fn parse_file(text: &str, origin: &str) -> Result<(u32, Schema), String> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("{origin}: not JSON: {e}"))?;
    let id = json
        .get(ID_ATTRIBUTE)
        .and_then(serde_json::Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("{origin}: no \"{ID_ATTRIBUTE}\": <id> attribute"))?;
    let schema = Schema::parse_str(text).map_err(|e| format!("{origin}: not an Avro schema: {e}"))?;
    Ok((id, schema))
}

/// The writer schemas this process knows (see the module doc).
pub struct Schemas {
    known: RwLock<HashMap<u32, Arc<Writer>>>,
    registry: Option<Registry>,
}

static BUILTIN: LazyLock<Schemas> = LazyLock::new(|| Schemas::new(None));

impl Schemas {
    /// Only the compiled-in schema.
    pub fn builtin() -> &'static Schemas {
        &BUILTIN
    }

    /// The compiled-in schema, plus a registry to ask for other ids.
    pub fn new(registry_url: Option<&str>) -> Schemas {
        let mut known = HashMap::new();
        let v1 = Writer::new(USAGE_EVENT_V1_ID, "compiled".into(), SCHEMA_V1.clone());
        assert!(v1.reader.is_ok() && v1.exact, "the reader reads its own schema");
        known.insert(USAGE_EVENT_V1_ID, Arc::new(v1));
        Schemas { known: RwLock::new(known), registry: registry_url.map(Registry::new) }
    }

    /// Add every `*.avsc` file of `dir` (each carrying its id). An id given twice with
    /// different schemas, or a file that cannot be read, is an error.
    pub fn load_dir(&self, dir: &Path) -> Result<usize, String> {
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut paths: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "avsc"))
            .collect();
        paths.sort();
        let mut added = 0;
        for path in paths {
            let origin = path.display().to_string();
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{origin}: {e}"))?;
            let (id, schema) = parse_file(&text, &origin)?;
            if let Some(w) = self.get(id) {
                let same = w.exact && schema.canonical_form() == SCHEMA_V1.canonical_form();
                if !same && w.source != origin {
                    return Err(format!("{origin}: schema id {id} is already {} ({})", w.summary, w.source));
                }
                continue;
            }
            self.insert(Writer::new(id, origin, schema))?;
            added += 1;
        }
        Ok(added)
    }

    fn get(&self, id: u32) -> Option<Arc<Writer>> {
        self.known.read().expect("schemas lock").get(&id).cloned()
    }

    fn insert(&self, w: Writer) -> Result<Arc<Writer>, String> {
        let mut known = self.known.write().expect("schemas lock");
        if let Some(existing) = known.get(&w.id) {
            return Ok(existing.clone());
        }
        if known.len() >= SCHEMAS_MAX {
            return Err(format!("schema id {} not loaded: {SCHEMAS_MAX} schema ids are held already", w.id));
        }
        if let Some(why) = w.incompatible() {
            tracing::warn!(schema_id = w.id, source = %w.source, reason = why, "writer schema Tally cannot read");
        }
        let w = Arc::new(w);
        known.insert(w.id, w.clone());
        Ok(w)
    }

    /// Every known id: (id, source, summary, why it is incompatible if it is).
    pub fn list(&self) -> Vec<(u32, String, String, Option<String>)> {
        let known = self.known.read().expect("schemas lock");
        let sorted: BTreeMap<u32, &Arc<Writer>> = known.iter().map(|(k, v)| (*k, v)).collect();
        sorted
            .into_values()
            .map(|w| (w.id, w.source.clone(), w.summary.clone(), w.incompatible().map(str::to_string)))
            .collect()
    }

    /// Make sure the frame's writer schema is known before it is decoded: ask the registry
    /// (if any) for an id seen for the first time, retrying through an outage until it
    /// answers or `stop` fires. Returns `false` only when stopped. Frames that are not
    /// even framed, ids the registry does not have, or a full cache are left to
    /// [`Schemas::decode`], which dead-letters them with the reason.
    pub async fn prepare(&self, frame: &[u8], stop: &tokio_util::sync::CancellationToken) -> bool {
        let Ok(id) = frame_schema_id(frame) else { return true };
        if id == USAGE_EVENT_V1_ID || self.get(id).is_some() {
            return true;
        }
        let Some(registry) = &self.registry else { return true };
        let mut delay = RETRY_DELAY_MIN;
        loop {
            match registry.fetch(id).await {
                Ok(Some(text)) => {
                    let writer = match Schema::parse_str(&text) {
                        Ok(schema) => Writer::new(id, "registry".into(), schema),
                        Err(e) => Writer {
                            id,
                            source: "registry".into(),
                            summary: "unparseable".into(),
                            reader: Err(format!("schema {id} from the registry is not valid Avro: {e}")),
                            exact: false,
                        },
                    };
                    if let Err(e) = self.insert(writer) {
                        tracing::warn!(schema_id = id, error = %e, "schema not cached");
                    }
                    return true;
                }
                Ok(None) => return true,
                Err(e) => {
                    metrics::counter!(crate::metrics::SCHEMA_REGISTRY_ERRORS).increment(1);
                    tracing::warn!(schema_id = id, error = %e, retry_in_ms = delay.as_millis() as u64,
                        "schema registry unavailable; the batch waits");
                    tokio::select! {
                        _ = stop.cancelled() => return false,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(RETRY_DELAY_MAX);
                }
            }
        }
    }

    /// Load every schema the registry lists (`GET /schemas`, which Confluent's registry
    /// serves since 7.x: `[{"id", "schema", ...}]`), for `tally schema list`. Returns how
    /// many ids it added; `Err` if there is no registry or it does not answer.
    pub async fn load_registry_listing(&self) -> Result<usize, String> {
        let registry = self.registry.as_ref().ok_or("no schema registry configured")?;
        let mut added = 0;
        for (id, text) in registry.list().await? {
            if self.get(id).is_some() {
                continue;
            }
            let schema =
                Schema::parse_str(&text).map_err(|e| format!("schema {id} from the registry: {e}"))?;
            self.insert(Writer::new(id, "registry".into(), schema))?;
            added += 1;
        }
        Ok(added)
    }

    /// Decode a frame with its writer schema. Unknown ids (`unknown_schema`) and schemas
    /// Tally cannot read (`incompatible_schema`, with the field) are errors for the dead
    /// letter, never guesses.
    pub fn decode(&self, frame: &[u8]) -> Result<RawUsageEvent, DecodeError> {
        let id = frame_schema_id(frame)?;
        let Some(writer) = self.get(id) else {
            let how = if self.registry.is_some() {
                "in the schema registry"
            } else {
                "compiled in or in the schema directory"
            };
            return Err(err("unknown_schema", format!("schema id {id} is not known ({how})")));
        };
        match &writer.reader {
            Ok(reader) => decode_body(reader, &frame[5..], writer.exact),
            Err(why) => Err(err("incompatible_schema", format!("schema id {id}: {why}"))),
        }
    }
}

/// A schema as the registry answers it (`GET /schemas/ids/{id}` has no id; `GET /schemas`
/// items do).
#[derive(serde::Deserialize)]
struct RegistrySchema {
    id: Option<u32>,
    schema: String,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
}

/// A Confluent-compatible schema registry's `GET /schemas/ids/{id}` and `GET /schemas`.
struct Registry {
    base: String,
    http: reqwest::Client,
}

impl Registry {
    fn new(url: &str) -> Registry {
        let http = reqwest::Client::builder().timeout(REGISTRY_TIMEOUT).build().expect("http client");
        Registry { base: url.trim_end_matches('/').to_string(), http }
    }

    /// `GET {base}{path}` as the registry's API documents it.
    async fn get(&self, path: &str) -> Result<reqwest::Response, String> {
        self.http
            .get(format!("{}{path}", self.base))
            .header("accept", "application/vnd.schemaregistry.v1+json, application/json")
            .send()
            .await
            .map_err(|e| e.to_string())
    }

    /// Every (id, schema text) the registry lists (`GET /schemas`), Avro only.
    async fn list(&self) -> Result<Vec<(u32, String)>, String> {
        let r = self.get("/schemas").await?;
        if !r.status().is_success() {
            return Err(format!("GET /schemas: HTTP {}", r.status().as_u16()));
        }
        let listed: Vec<RegistrySchema> = r.json().await.map_err(|e| format!("GET /schemas: {e}"))?;
        let mut out: Vec<(u32, String)> = listed
            .into_iter()
            .filter(|l| l.schema_type.as_deref().is_none_or(|t| t == "AVRO"))
            .map(|l| (l.id.unwrap_or(0), l.schema))
            .filter(|(id, _)| *id > 0)
            .collect();
        out.sort_by_key(|(id, _)| *id);
        out.dedup_by_key(|(id, _)| *id);
        Ok(out)
    }

    /// `Ok(Some(schema text))`, `Ok(None)` when the registry says the id does not exist,
    /// `Err` for anything else (an outage: retried).
    async fn fetch(&self, id: u32) -> Result<Option<String>, String> {
        let r = self.get(&format!("/schemas/ids/{id}")).await?;
        match r.status().as_u16() {
            200 => {
                let found: RegistrySchema = r.json().await.map_err(|e| format!("unexpected answer: {e}"))?;
                match found.schema_type.as_deref() {
                    None | Some("AVRO") => Ok(Some(found.schema)),
                    // Not an outage: a schema Tally cannot read. Parsing it fails below and
                    // its events are dead-lettered with the reason.
                    Some(other) => Ok(Some(format!("{{\"unsupported schemaType\": \"{other}\"}}"))),
                }
            }
            404 => Ok(None),
            status => Err(format!("HTTP {status}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1_json() -> serde_json::Value {
        serde_json::from_str(super::super::USAGE_EVENT_V1).unwrap()
    }

    fn fields_without(names: &[&str]) -> serde_json::Value {
        let mut s = v1_json();
        let fields = s["fields"].as_array_mut().unwrap();
        fields.retain(|f| !names.contains(&f["name"].as_str().unwrap()));
        s
    }

    #[test]
    fn the_reader_reads_writers_that_add_or_omit_defaulted_fields() {
        let mut v2 = v1_json();
        let fields = v2["fields"].as_array_mut().unwrap();
        fields.push(serde_json::json!({"name": "region", "type": "string", "default": "eu"}));
        fields.push(serde_json::json!({"name": "request_id", "type": ["null", "string"], "default": null}));
        assert_eq!(check(&Schema::parse(&v2).unwrap()), Ok(()));
        let v0 = fields_without(&["user_agent", "request_ip", "latency_ms"]);
        assert_eq!(check(&Schema::parse(&v0).unwrap()), Ok(()));
    }

    #[test]
    fn incompatible_writers_are_named_with_the_field() {
        let missing = fields_without(&["account_id"]);
        let why = check(&Schema::parse(&missing).unwrap()).unwrap_err();
        assert!(why.contains("account_id"), "{why}");
        let mut retyped = v1_json();
        for f in retyped["fields"].as_array_mut().unwrap() {
            if f["name"] == "input_tokens" {
                f["type"] = serde_json::json!("string");
                f["default"] = serde_json::json!("0");
            }
        }
        let why = check(&Schema::parse(&retyped).unwrap()).unwrap_err();
        assert!(why.contains("input_tokens"), "{why}");
        let mut millis = v1_json();
        millis["fields"][1]["type"] = serde_json::json!({"type": "long", "logicalType": "timestamp-millis"});
        let why = check(&Schema::parse(&millis).unwrap()).unwrap_err();
        assert!(why.contains("occurred_at"), "{why}");
    }

    #[test]
    fn a_schema_file_carries_its_id() {
        let mut s = v1_json();
        s[ID_ATTRIBUTE] = serde_json::json!(7);
        let (id, schema) = parse_file(&s.to_string(), "x.avsc").unwrap();
        assert_eq!((id, schema.canonical_form()), (7, SCHEMA_V1.canonical_form()));
        s.as_object_mut().unwrap().remove(ID_ATTRIBUTE);
        assert!(parse_file(&s.to_string(), "y.avsc").unwrap_err().contains(ID_ATTRIBUTE));
    }
}
