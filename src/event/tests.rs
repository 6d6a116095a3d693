use super::*;

fn raw() -> RawUsageEvent {
    RawUsageEvent {
        event_id: Some("evt_1".into()),
        occurred_at: Some("2026-11-01T12:00:00Z".into()),
        account_id: Some("acct_1".into()),
        provider: Some("anthropic".into()),
        model: Some("claude-sonnet-4".into()),
        modality: Some("chat".into()),
        status: Some("success".into()),
        input_tokens: Some(1000),
        cached_input_tokens: Some(400),
        cache_write_tokens: Some(100),
        output_tokens: Some(50),
        reasoning_tokens: Some(10),
        upstream_cost: Some("0.0123".into()),
        ..Default::default()
    }
}

#[test]
fn parses_a_valid_event_and_round_trips() {
    let e = UsageEvent::parse(raw()).unwrap();
    assert_eq!(e.counts.input_tokens, 1000);
    assert_eq!(e.billing_mode, BillingMode::Platform);
    assert_eq!(e.upstream_cost, Some(Decimal::from_str("0.0123").unwrap()));
    assert_eq!(UsageEvent::parse(e.to_raw()).unwrap(), e);
}

#[test]
fn rejects_negative_and_oversized_counts() {
    let mut r = raw();
    r.output_tokens = Some(-1);
    let err = UsageEvent::parse(r).unwrap_err();
    assert_eq!(err.field, "output_tokens");
    let mut r = raw();
    r.images = Some(COUNT_MAX + 1);
    assert_eq!(UsageEvent::parse(r).unwrap_err().field, "images");
}

#[test]
fn rejects_subsets_larger_than_totals() {
    let mut r = raw();
    r.cached_input_tokens = Some(1001);
    assert_eq!(UsageEvent::parse(r).unwrap_err().field, "cached_input_tokens");
    let mut r = raw();
    r.cached_input_tokens = Some(600);
    r.cache_write_tokens = Some(500);
    assert_eq!(UsageEvent::parse(r).unwrap_err().field, "cached_input_tokens + cache_write_tokens");
    let mut r = raw();
    r.reasoning_tokens = Some(51);
    assert_eq!(UsageEvent::parse(r).unwrap_err().field, "reasoning_tokens");
}

#[test]
fn rejects_missing_ids_bad_enums_and_bad_money() {
    let mut r = raw();
    r.event_id = None;
    assert_eq!(UsageEvent::parse(r).unwrap_err().field, "event_id");
    let mut r = raw();
    r.account_id = Some(String::new());
    assert_eq!(UsageEvent::parse(r).unwrap_err().field, "account_id");
    let mut r = raw();
    r.modality = Some("hologram".into());
    assert_eq!(UsageEvent::parse(r).unwrap_err().field, "modality");
    let mut r = raw();
    r.status = Some("ok".into());
    assert_eq!(UsageEvent::parse(r).unwrap_err().field, "status");
    for bad in ["-1", "1e5", "abc", "1.2.3", "NaN"] {
        let mut r = raw();
        r.upstream_cost = Some(bad.into());
        assert_eq!(UsageEvent::parse(r).unwrap_err().field, "upstream_cost", "{bad}");
    }
    let mut r = raw();
    r.occurred_at = Some("yesterday".into());
    assert_eq!(UsageEvent::parse(r).unwrap_err().field, "occurred_at");
}

#[test]
fn json_lines_refuse_unknown_fields() {
    let err = parse_json_line(r#"{"event_id":"e","colour":"red"}"#).unwrap_err();
    assert_eq!(err.field, "json");
    assert!(err.problem.contains("colour"));
}

#[test]
fn refuses_nul_in_free_text_which_postgres_cannot_store() {
    let mut r = raw();
    r.feature = Some("chat\0x".into());
    assert_eq!(UsageEvent::parse(r).unwrap_err().field, "feature");
    let mut r = raw();
    r.user_agent = Some("curl/8 (tab\tok)".into());
    assert!(UsageEvent::parse(r).is_ok(), "other characters stay allowed in free text");
}
