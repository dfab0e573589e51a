"""A stock Open Inference Protocol client (tritonclient[http]) and a stock Prometheus
text-format parser (prometheus_client) against Lathe's local API.

    v2_client.py HOST:PORT MODEL SPEC.json

SPEC names the inputs ({"inputs": {name: {"shape": [...], "values": [...]}}, "outputs":
[names]}). Prints one JSON object of what the clients saw; the end-to-end test judges it.
"""

import json
import sys
import urllib.request

import numpy as np
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException


def error_of(call):
    try:
        call()
    except InferenceServerException as e:
        return str(e)
    return None


def main():
    url, model, spec_file = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(spec_file) as f:
        spec = json.load(f)
    client = httpclient.InferenceServerClient(url=url)
    seen = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "unknown_ready": client.is_model_ready("no-such-model"),
        "server": client.get_server_metadata(),
        "metadata": client.get_model_metadata(model),
    }
    arrays = {
        name: np.array(t["values"], dtype=np.float32).reshape(t["shape"])
        for name, t in spec["inputs"].items()
    }

    def inputs(binary=False):
        made = []
        for name, a in arrays.items():
            i = httpclient.InferInput(name, list(a.shape), "FP32")
            i.set_data_from_numpy(a, binary_data=binary)
            made.append(i)
        return made

    asked = [httpclient.InferRequestedOutput(n, binary_data=False) for n in spec["outputs"]]
    r = client.infer(model, inputs(), outputs=asked, request_id="req-1")
    seen["id"] = r.get_response().get("id")
    seen["outputs"] = {}
    for n in spec["outputs"]:
        a = r.as_numpy(n)
        seen["outputs"][n] = {
            "shape": list(a.shape),
            "dtype": str(a.dtype),
            "values": a.astype(float).ravel().tolist(),
        }
    # Without requested outputs the client asks for binary ones; JSON ones are read as well.
    r = client.infer(model, inputs())
    seen["all_outputs"] = sorted(o["name"] for o in r.get_response()["outputs"])

    first = next(iter(arrays))
    wrong = httpclient.InferInput(first, [1, 3], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3), np.float32), binary_data=False)
    seen["wrong_shape"] = error_of(lambda: client.infer(model, [wrong]))
    seen["binary_input"] = error_of(lambda: client.infer(model, inputs(binary=True)))
    seen["unknown_model"] = error_of(lambda: client.infer("no-such-model", inputs()))

    text = urllib.request.urlopen(f"http://{url}/metrics").read().decode()
    seen["metrics"] = {
        family.name: {
            "type": family.type,
            "samples": [[s.name, s.labels, s.value] for s in family.samples],
        }
        for family in text_string_to_metric_families(text)
    }
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
