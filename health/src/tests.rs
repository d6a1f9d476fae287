use super::*;
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

fn ready_snapshot() -> Snapshot {
    Snapshot {
        lease: Some((
            "10.244.3.0/24".into(),
            SystemTime::now() + Duration::from_secs(30),
        )),
        datapath_programmed: true,
        watches_synced: true,
        ..Default::default()
    }
}

#[test]
fn not_ready_before_the_lease_then_ready() {
    let mut s = Snapshot::default();
    let why = readiness(&s, SystemTime::now()).unwrap_err();
    assert!(why.iter().any(|w| w.contains("no subnet lease")), "{why:?}");
    assert!(why.iter().any(|w| w.contains("datapath not programmed")));
    assert!(why.iter().any(|w| w.contains("watches not synced")));
    s = ready_snapshot();
    readiness(&s, SystemTime::now()).unwrap();
}

#[test]
fn expired_lease_bad_config_and_datapath_errors_are_not_ready() {
    let mut s = ready_snapshot();
    s.lease = Some((
        "10.244.3.0/24".into(),
        SystemTime::now() - Duration::from_secs(1),
    ));
    assert!(readiness(&s, SystemTime::now()).unwrap_err()[0].contains("expired"));
    let mut s = ready_snapshot();
    s.config_error = Some("encryption: \"ipsec\" is not none or wireguard".into());
    let why = readiness(&s, SystemTime::now()).unwrap_err();
    assert_eq!(why.len(), 1);
    assert!(why[0].contains("sluice-config: encryption"));
    let mut s = ready_snapshot();
    s.datapath_error = Some("netlink: EPERM".into());
    assert!(readiness(&s, SystemTime::now()).is_err());
}

#[test]
fn a_failed_policy_pass_is_not_ready_and_says_why() {
    let mut s = ready_snapshot();
    s.policy_error = Some("nft apply failed: Error: Could not process rule".into());
    let why = readiness(&s, SystemTime::now()).unwrap_err();
    assert_eq!(
        why,
        ["policy: nft apply failed: Error: Could not process rule"]
    );
    s.policy_error = None;
    readiness(&s, SystemTime::now()).unwrap();
}

#[test]
fn an_unreachable_peer_is_not_ready_and_says_why() {
    let mut s = ready_snapshot();
    assert!(readiness(&s, SystemTime::now()).is_ok());
    s.unreachable_peers =
        vec!["n3 (underlay 172.31.1.13): other underlay subnet (overlay: never)".into()];
    let why = readiness(&s, SystemTime::now()).unwrap_err();
    assert_eq!(why.len(), 1);
    assert!(why[0].starts_with("peer unreachable: n3"), "{why:?}");
}

#[test]
fn liveness_fails_only_for_a_wedged_loop() {
    let now = Instant::now();
    let mut s = Snapshot::default();
    // Nothing registered yet: alive (the process is starting).
    liveness(&s, now, Duration::from_secs(60)).unwrap();
    s.heartbeats
        .insert("datapath".into(), now - Duration::from_secs(5));
    liveness(&s, now, Duration::from_secs(60)).unwrap();
    s.heartbeats
        .insert("policy".into(), now - Duration::from_secs(90));
    let why = liveness(&s, now, Duration::from_secs(60)).unwrap_err();
    assert_eq!(why, ["loop policy has not run for 90s"]);
}

async fn get(h: &Health, path: &str) -> (StatusCode, String) {
    let resp = h
        .router()
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn endpoints_answer_per_state() {
    let h = Health::new(Duration::from_millis(200), "0.1.0", "abc");
    for path in ["/readyz", "/readiness"] {
        let (code, body) = get(&h, path).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("no subnet lease held yet"), "{body}");
    }
    h.update(|s| *s = ready_snapshot());
    for path in ["/readyz", "/readiness"] {
        assert_eq!(get(&h, path).await, (StatusCode::OK, "ready\n".into()));
    }
    h.update(|s| s.config_error = Some("mtu: \"12\" is not auto or a number".into()));
    let (code, body) = get(&h, "/readyz").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("sluice-config: mtu"), "{body}");
    h.beat("datapath");
    for path in ["/healthz", "/liveness"] {
        assert_eq!(get(&h, path).await, (StatusCode::OK, "ok\n".into()));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, body) = get(&h, "/healthz").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("loop datapath has not run"), "{body}");
    h.metrics.peers.set(3);
    h.metrics
        .cluster_network_policies
        .get_or_create(&crate::metrics::TierLabels {
            tier: "Baseline".into(),
        })
        .set(2);
    let (code, body) = get(&h, "/metrics").await;
    assert_eq!(code, StatusCode::OK);
    assert!(body.contains("sluice_peers 3"), "{body}");
    assert!(
        body.contains("sluice_cluster_network_policies{tier=\"Baseline\"} 2"),
        "{body}"
    );
    assert!(
        body.contains("sluice_build_info{version=\"0.1.0\",commit=\"abc\"} 1"),
        "{body}"
    );
    h.update(|s| s.status = serde_json::json!({"node": "n1"}));
    assert_eq!(get(&h, "/status").await.1, "{\"node\":\"n1\"}");
}
