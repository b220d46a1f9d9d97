"""Triton's own gRPC client (tritonclient) against a partita worker node: the Open Inference
Protocol's live/ready/metadata/infer calls, and its errors. Run by tests/tests/oip.rs.

Usage: tritonclient_check.py HOST:PORT MODELS_DIR
Scores are compared with the same TorchScript model run here by PyTorch. Prints one line per
check; exits non-zero on the first that fails.
"""

import sys

import numpy as np
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

url, models = sys.argv[1], sys.argv[2]
client = grpcclient.InferenceServerClient(url=url)


def check(what, cond, detail=""):
    if not cond:
        print(f"FAILED: {what} {detail}", flush=True)
        sys.exit(1)
    print(f"ok: {what}", flush=True)


def inputs(features, state=None, datatype="FP32"):
    out = [grpcclient.InferInput("features", list(features.shape), datatype)]
    out[0].set_data_from_numpy(features)
    if state is not None:
        out.append(grpcclient.InferInput("state", list(state.shape), datatype))
        out[1].set_data_from_numpy(state)
    return out


def refused(what, code, needle, model, tensors, outputs=None):
    try:
        client.infer(model, tensors, outputs=outputs)
    except InferenceServerException as e:
        status, message = str(e.status()), e.message()
        check(what, status == f"StatusCode.{code}" and needle in message, f"got {status}: {message}")
        return
    check(what, False, "the call succeeded")


check("server live", client.is_server_live())
check("server ready", client.is_server_ready())
meta = client.get_server_metadata(as_json=True)
check("server metadata names partita", meta["name"] == "partita", str(meta))
check("model ready", client.is_model_ready("fraud_gru") and client.is_model_ready("fraud_mlp"))
check("an unknown model is not ready", not client.is_model_ready("nonexistent"))
check("another version is not ready", not client.is_model_ready("fraud_gru", "99"))

gru = client.get_model_metadata("fraud_gru", as_json=True)
shapes = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in gru["inputs"] + gru["outputs"]}
check(
    "fraud_gru metadata: state is an ordinary input, new_state an output",
    shapes == {
        "features": ("FP32", [-1, 16]),
        "state": ("FP32", [-1, 64]),
        "score": ("FP32", [-1]),
        "new_state": ("FP32", [-1, 64]),
    }
    and gru["platform"] == "pytorch_libtorch"
    and gru["versions"] == ["1"],
    str(gru),
)
config = client.get_model_config("fraud_gru", as_json=True)["config"]
check(
    "fraud_gru config (Triton's extension, for perf_analyzer): max batch, dims without the batch",
    int(config["max_batch_size"]) == 512
    and [(i["name"], [int(d) for d in i["dims"]]) for i in config["input"]] == [("features", [16]), ("state", [64])]
    and config["dynamic_batching"]["preferred_batch_size"] == [64, 256],
    str(config),
)
mlp = client.get_model_metadata("fraud_mlp", as_json=True)
check("fraud_mlp metadata: stateless", [t["name"] for t in mlp["inputs"]] == ["features"], str(mlp))

rng = np.random.default_rng(7)
features = rng.standard_normal((5, 16), dtype=np.float32)
state = rng.standard_normal((5, 64), dtype=np.float32)
result = client.infer("fraud_gru", inputs(features, state), request_id="req-1")
reference = torch.jit.load(f"{models}/fraud_gru/1/model.pt")
with torch.no_grad():
    score, new_state = reference(torch.from_numpy(features), torch.from_numpy(state))
got_score, got_state = result.as_numpy("score"), result.as_numpy("new_state")
check("score shape [5]", got_score.shape == (5,), str(got_score.shape))
check("new_state shape [5, 64]", got_state.shape == (5, 64), str(got_state.shape))
check("scores equal PyTorch's", np.allclose(got_score, score.numpy(), atol=1e-4), f"{got_score} vs {score}")
check("new states equal PyTorch's", np.allclose(got_state, new_state.numpy(), atol=1e-4))
response = result.get_response(as_json=True)
check("the request id is echoed", response["id"] == "req-1", str(response.get("id")))
check("the model version is answered", response["model_version"] == "1", str(response))

only = client.infer("fraud_gru", inputs(features, state), outputs=[grpcclient.InferRequestedOutput("score")])
check("only the asked output", only.as_numpy("new_state") is None and only.as_numpy("score").shape == (5,))

mlp_features = rng.standard_normal((3, 16), dtype=np.float32)
mlp_score = client.infer("fraud_mlp", inputs(mlp_features)).as_numpy("score")
with torch.no_grad():
    mlp_reference = torch.jit.load(f"{models}/fraud_mlp/1/model.pt")(torch.from_numpy(mlp_features))
check("stateless scores equal PyTorch's", np.allclose(mlp_score, mlp_reference.numpy(), atol=1e-4))

refused("unknown model", "NOT_FOUND", 'unknown model "nonexistent"', "nonexistent", inputs(features, state))
refused("wrong width", "INVALID_ARGUMENT", "has shape [5, 15]", "fraud_gru", inputs(features[:, :15], state))
refused("missing state", "INVALID_ARGUMENT", 'needs input "state"', "fraud_gru", inputs(features))
refused(
    "wrong datatype",
    "INVALID_ARGUMENT",
    'datatype "FP64"',
    "fraud_gru",
    inputs(features.astype(np.float64), state.astype(np.float64), datatype="FP64"),
)
bad = features.copy()
bad[2, 3] = np.nan
refused("a NaN names its row", "INVALID_ARGUMENT", "row 2: features[3] is NaN", "fraud_gru", inputs(bad, state))
refused(
    "unknown output",
    "INVALID_ARGUMENT",
    'no output "probability"',
    "fraud_gru",
    inputs(features, state),
    outputs=[grpcclient.InferRequestedOutput("probability")],
)
after = client.infer("fraud_gru", inputs(features, state)).as_numpy("score")
check("the node still scores after the refusals", np.allclose(after, got_score, atol=1e-6))
print("all checks passed", flush=True)
