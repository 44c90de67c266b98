//! A Parley whose agent thinks with a remote replica: another real Parley's
//! `/v1/chat/completions`, configured as `[[llm.replicas]]`.

use std::time::Duration;

use parley_tests::{Client, start_server};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_can_think_with_a_remote_replica() {
    let (replica, front) = tokio::task::spawn_blocking(|| {
        let replica = start_server(&[]).expect("start the replica");
        let dir = std::env::temp_dir().join(format!("parley-remote-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let config = dir.join("parley.toml");
        std::fs::write(
            &config,
            format!("[llm]\n[[llm.replicas]]\nname = \"other-parley\"\nbase_url = \"http://{}/v1\"\nmodel = \"parley\"\n\n[tools]\npharmacy = false\n", replica.addr),
        )
        .expect("write config");
        let front = start_server(&["--config", config.to_str().expect("utf-8")]).expect("start the front server");
        (replica, front)
    })
    .await
    .expect("join");
    let mut c = Client::connect(&front).await.expect("connect");
    c.send(json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is the capital of Germany? Answer in one short sentence."}]}}))
        .await
        .expect("send");
    c.send(json!({"type": "response.create"})).await.expect("send");
    let done = c.wait_for("response.done", Duration::from_secs(120)).await.expect("response");
    assert_eq!(done["response"]["status"], "completed", "{done}");
    let said = done["response"]["output"][0]["content"][0]["transcript"].as_str().unwrap_or("").to_lowercase();
    assert!(said.contains("berlin"), "agent said {said:?}");
    assert!(c.types().iter().any(|t| t == "response.output_audio.delta"));
    // The front's language model is the remote pool, not an embedded model.
    let (status, models) = parley_tests::http_get(&front.addr, "/v1/models").await.expect("models");
    assert_eq!(status, 200, "{models}");
    assert!(models.contains("remote:"), "front server's model list: {models}");
    drop(replica);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_healthy_replica_the_caller_hears_an_apology_and_the_call_stays_up() {
    let front = tokio::task::spawn_blocking(|| {
        let dir = std::env::temp_dir().join(format!("parley-noreplica-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let config = dir.join("parley.toml");
        // Nothing listens on port 9 (discard): the only replica is down from the start.
        std::fs::write(&config, "[llm]\nconnect_timeout_ms = 300\n[[llm.replicas]]\nname = \"gone\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"x\"\n\n[tools]\npharmacy = false\n").expect("write config");
        start_server(&["--config", config.to_str().expect("utf-8")]).expect("start the server")
    })
    .await
    .expect("join");
    let mut c = Client::connect(&front).await.expect("connect");
    for round in 0..2 {
        c.send(json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Are you there?"}]}}))
            .await
            .expect("send");
        c.send(json!({"type": "response.create"})).await.expect("send");
        let done = c.wait_for("response.done", Duration::from_secs(60)).await.expect("response.done");
        assert_eq!(done["response"]["status"], "failed", "round {round}: {done}");
    }
    let errors: Vec<String> = c.events.iter().filter(|e| e["type"] == "error").map(|e| e["error"]["message"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().all(|m| m.contains("no healthy LLM replica")), "{errors:?}");
    let said: String = c.events.iter().filter(|e| e["type"] == "response.output_audio_transcript.delta").map(|e| e["delta"].as_str().unwrap_or("")).collect();
    assert!(said.contains("technical problem"), "the caller heard {said:?}");
    assert!(c.types().iter().any(|t| t == "response.output_audio.delta"), "the apology is spoken");
}
