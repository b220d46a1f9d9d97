//! The node's log subscriber keeps every line: creating a Kafka client (rdkafka asks the `log`
//! crate whether librdkafka's debug level is on) must not swallow the next event, as a per-layer
//! `EnvFilter` does (tokio-rs/tracing#2519). Its own test binary: it installs the global
//! subscriber.

use std::sync::{Arc, Mutex};

use partita_runtime::telemetry::traces::{LogFormat, init_with_writer};
use rdkafka::producer::BaseProducer;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn the_first_line_after_creating_a_kafka_client_is_logged() {
    let captured = Captured::default();
    let writer = captured.clone();
    init_with_writer(LogFormat::Text, None, move || writer.clone()).unwrap();
    tracing::warn!("before any client");
    for i in 0..3 {
        let _producer: BaseProducer = partita_runtime::kafka::client_config("127.0.0.1:1").create().unwrap();
        tracing::warn!("line {i} right after creating a client");
    }
    let text = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    for line in ["before any client", "line 0 right", "line 1 right", "line 2 right"] {
        assert!(text.contains(line), "{line:?} was not logged; the log:\n{text}");
    }
}
