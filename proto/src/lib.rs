//! partita's wire schemas. The `.proto` files under `proto/partita/` are the source of truth;
//! field numbers are never reused (decisions in docs/pipeline.md).

/// `partita.v1`: events, scores, dead letters, and inference rows between nodes.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/partita.v1.rs"));
}

/// `inference`: the Open Inference Protocol (KServe V2) over gRPC, which a worker node serves:
/// messages, `grpc_inference_service_server` and `grpc_inference_service_client`.
pub mod inference {
    include!(concat!(env!("OUT_DIR"), "/inference.rs"));
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::v1::*;

    #[test]
    fn rows_round_trip() {
        let req = InferBatchRequest {
            model: "fraud_gru".into(),
            rows: vec![InferRow { features: vec![1.0, 2.0], state: vec![] }],
        };
        let bytes = req.encode_to_vec();
        assert_eq!(InferBatchRequest::decode(&*bytes).unwrap(), req);
    }
}
