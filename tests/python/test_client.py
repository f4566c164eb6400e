"""The Python client (client/python) and the Open Inference Protocol, against a real mmdit-server
on the sd3_tiny golden model, over loopback. Run by ctest (python_client_test) with
MMDIT_SERVER (the binary), MMDIT_GOLDEN (tests/data/golden) and PYTHONPATH (the built package)."""
import os
import pathlib
import subprocess

import grpc
import numpy as np
import pytest

import server_process
from mmdit_client import Client, MmditError, RemoteTransformer
from mmdit_client._generated.inference import grpc_predict_v2_pb2 as v2
from mmdit_client._generated.inference import grpc_predict_v2_pb2_grpc as v2_grpc

GOLDEN = pathlib.Path(os.environ["MMDIT_GOLDEN"])
MODEL = GOLDEN / "sd3_tiny"


def start_server(*extra):
    return server_process.start_server(MODEL, "--warmup", "1x4x8x8/5", *extra)


@pytest.fixture(scope="module")
def server():
    process, port = start_server()
    yield f"127.0.0.1:{port}"
    server_process.stop_server(process)


@pytest.fixture(scope="module")
def client(server):
    with Client(server, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def golden():
    return {name: np.load(MODEL / f"{name}.npy")
            for name in ("img_latent", "txt_embed", "timestep", "pooled_text", "expected")}


def random_inputs(batch=2, height=8, width=8, tokens=5, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, 4, height, width), dtype=np.float32),
            rng.standard_normal((batch, tokens, 40), dtype=np.float32),
            np.arange(batch, dtype=np.float32) * 100 + 250,
            rng.standard_normal((batch, 24), dtype=np.float32))


def test_health_and_info(client):
    assert client.health() == "SERVING"
    assert client.health("mmdit.v1.Denoiser") == "SERVING"
    with pytest.raises(MmditError) as error:
        client.health("no.such.Service")
    assert error.value.code == grpc.StatusCode.NOT_FOUND
    info = client.info()
    assert info["model"]["txt_dim"] == 40 and info["model"]["cond_dim"] == 24
    assert isinstance(info["limits"]["max_receive_message_bytes"], int)


def test_denoise_matches_the_golden_case(client, golden):
    prediction = client.denoise(golden["img_latent"], golden["txt_embed"], golden["timestep"], golden["pooled_text"])
    assert prediction.dtype == np.float32 and prediction.shape == golden["expected"].shape
    assert np.max(np.abs(prediction - golden["expected"])) <= 1e-4


def test_half_precision_dtypes_round_trip(client):
    inputs = random_inputs(seed=1)
    reference = client.denoise(*inputs)
    for dtype, numpy_dtype in (("fp16", np.float16), ("bf16", np.float32)):
        prediction = client.denoise(*inputs, dtype=dtype)
        assert prediction.dtype == numpy_dtype
        assert np.max(np.abs(prediction.astype(np.float32) - reference)) <= 0.1, dtype


def test_errors_carry_the_code_and_the_field(client):
    img, txt, t, pooled = random_inputs()
    with pytest.raises(MmditError) as error:
        client.denoise(img, txt[:, :, :39], t, pooled)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "txt_embed" in error.value.details
    with pytest.raises(ValueError):
        client.denoise(img, txt, t, pooled, dtype="int8")


def test_deadlines(client):
    img, txt, t, pooled = random_inputs(batch=4, height=16, width=16, tokens=9)
    with pytest.raises(MmditError) as error:
        client.denoise(img, txt, t, pooled, timeout=1e-6)
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_mutual_tls(tmp_path):
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        ["req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=mmdit-test-ca"],
        ["req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
         "server.crt", "-days", "2", "-extfile", "san.ext"],
        ["req", *key, "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=mmdit-test-client"],
        ["x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
         "client.crt", "-days", "2"],
    ]
    (tmp_path / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for step in steps:
        subprocess.run(["openssl", *step], cwd=tmp_path, check=True, capture_output=True)
    files = {name: (tmp_path / name).read_bytes() for name in ("ca.crt", "client.key", "client.crt")}
    process, port = start_server("--tls_cert", str(tmp_path / "server.crt"), "--tls_key", str(tmp_path / "server.key"),
                                 "--tls_client_ca", str(tmp_path / "ca.crt"))
    try:
        with Client(f"localhost:{port}", root_certificates=files["ca.crt"], private_key=files["client.key"],
                    certificate_chain=files["client.crt"], timeout=30) as client:
            assert client.health() == "SERVING"
            assert client.denoise(*random_inputs(batch=1, seed=9)).shape == (1, 4, 8, 8)
        with Client(f"localhost:{port}", root_certificates=files["ca.crt"], timeout=10) as anonymous:
            with pytest.raises(MmditError) as error:  # no client certificate: the handshake fails
                anonymous.health()
            assert error.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server_process.stop_server(process)


def test_generate_streams_every_step_and_is_seeded(client):
    _, txt, _, pooled = random_inputs(batch=1, seed=2)

    def run(seed):
        return list(client.generate(txt, pooled, latent_shape=[4, 8, 8], steps=3, guidance_scale=1.0, seed=seed))

    first, again, other = run(7), run(7), run(8)
    assert [p.step for p in first] == [1, 2, 3] and [p.done for p in first] == [False, False, True]
    assert first[-1].latent.shape == (1, 4, 8, 8) and first[0].latent is None
    np.testing.assert_array_equal(first[-1].latent, again[-1].latent)
    assert np.max(np.abs(first[-1].latent - other[-1].latent)) > 1e-3
    with pytest.raises(MmditError) as error:
        list(client.generate(txt, pooled, latent_shape=[4, 8, 8], steps=3))  # CFG without a negative pair
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and "negative" in error.value.details


def test_remote_transformer_is_denoise(client):
    img, txt, t, pooled = random_inputs(seed=3)
    transformer = RemoteTransformer(client)
    assert transformer.config.in_channels == 4 and transformer.config.joint_attention_dim == 40
    out = transformer(hidden_states=img, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t)
    np.testing.assert_array_equal(out.sample, client.denoise(img, txt, t, pooled))
    # A scalar timestep is every sample's, as diffusers pipelines pass it.
    (sample,) = transformer(img, txt, pooled, np.float32(400), return_dict=False)
    np.testing.assert_array_equal(sample, client.denoise(img, txt, np.full(2, 400, np.float32), pooled))


def test_remote_transformer_with_torch_tensors(client):
    torch = pytest.importorskip("torch")
    img, txt, t, pooled = random_inputs(seed=4)
    out = RemoteTransformer(client)(torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(pooled),
                                    torch.from_numpy(t))
    assert isinstance(out.sample, torch.Tensor)
    assert RemoteTransformer(client).dtype == torch.float32
    np.testing.assert_array_equal(out.sample.numpy(), client.denoise(img, txt, t, pooled))


# --- The Open Inference Protocol, with stubs from our grpc_predict_v2.proto ----------------------

@pytest.fixture(scope="module")
def oip(server):
    channel = grpc.insecure_channel(server)
    yield v2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def infer_request(img, txt, t, pooled, typed=False):
    request = v2.ModelInferRequest(model_name="sd3_tiny", id="py")
    for name, value in (("img_latent", img), ("txt_embed", txt), ("timestep", t), ("pooled_text", pooled)):
        tensor = request.inputs.add(name=name, datatype="FP32", shape=list(value.shape))
        if typed:
            tensor.contents.fp32_contents.extend(value.reshape(-1).tolist())
        else:
            request.raw_input_contents.append(np.ascontiguousarray(value, "<f4").tobytes())
    return request


def test_oip_metadata(oip):
    assert oip.ServerLive(v2.ServerLiveRequest()).live
    assert oip.ServerReady(v2.ServerReadyRequest()).ready
    assert oip.ModelReady(v2.ModelReadyRequest(name="sd3_tiny")).ready
    assert not oip.ModelReady(v2.ModelReadyRequest(name="other")).ready
    assert oip.ServerMetadata(v2.ServerMetadataRequest()).name == "mmdit-serve"
    metadata = oip.ModelMetadata(v2.ModelMetadataRequest(name="sd3_tiny"))
    assert [i.name for i in metadata.inputs] == ["img_latent", "txt_embed", "timestep", "pooled_text"]
    assert list(metadata.inputs[0].shape) == [-1, 4, -1, -1]
    assert [o.name for o in metadata.outputs] == ["prediction"]
    with pytest.raises(grpc.RpcError) as error:
        oip.ModelMetadata(v2.ModelMetadataRequest(name="sd3"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_oip_infer_equals_denoise_raw_and_typed(client, oip):
    inputs = random_inputs(seed=5)
    expected = client.denoise(*inputs)
    for typed in (False, True):
        response = oip.ModelInfer(infer_request(*inputs, typed=typed))
        assert response.model_name == "sd3_tiny" and response.id == "py"
        (output,) = response.outputs
        assert output.name == "prediction" and output.datatype == "FP32" and list(output.shape) == list(expected.shape)
        got = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(expected.shape)
        np.testing.assert_array_equal(got, expected)


def test_oip_config_and_statistics(oip):
    config = oip.ModelConfig(v2.ModelConfigRequest(name="sd3_tiny")).config
    assert config.max_batch_size > 0
    assert [(i.name, list(i.dims)) for i in config.input] == [
        ("img_latent", [4, -1, -1]), ("txt_embed", [-1, 40]), ("timestep", [1]), ("pooled_text", [24])]
    before = oip.ModelStatistics(v2.ModelStatisticsRequest(name="sd3_tiny")).model_stats[0]
    inputs = random_inputs(batch=3, seed=8)
    oip.ModelInfer(infer_request(*inputs))
    after = oip.ModelStatistics(v2.ModelStatisticsRequest()).model_stats[0]
    assert after.inference_count == before.inference_count + 3
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1


def test_oip_malformed_requests(oip):
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    # (typed contents?, what breaks the request, the code, what the message names)
    cases = [
        (False, lambda r: setattr(r, "model_name", "nope"), not_found, "unknown model"),
        (False, lambda r: setattr(r, "model_version", "7"), not_found, 'no version "7"'),
        (False, lambda r: setattr(r.inputs[1], "name", "text"), invalid, 'unknown input "text"'),
        (False, lambda r: setattr(r.inputs[1], "name", "img_latent"), invalid, "given twice"),
        (False, lambda r: (r.inputs.pop(), r.raw_input_contents.pop()), invalid, "pooled_text"),
        (False, lambda r: setattr(r.inputs[0], "datatype", "INT64"), invalid, "datatype"),
        (False, lambda r: r.raw_input_contents.pop(), invalid, "raw_input_contents"),
        (False, lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 12), invalid, "img_latent"),
        (False, lambda r: r.inputs[2].contents.fp32_contents.append(1.0), invalid,
         "typed contents while raw_input_contents"),
        (True, lambda r: r.inputs[3].contents.fp32_contents.append(1.0), invalid, "fp32_contents"),
        (True, lambda r: setattr(r.inputs[2], "datatype", "FP16"), invalid, "FP16 has no typed contents"),
        (True, lambda r: (r.inputs[2].contents.ClearField("fp32_contents"),
                          r.inputs[2].contents.int_contents.extend([500, 501])), invalid, "contents.fp32_contents"),
        (False, lambda r: r.inputs[0].shape.__setitem__(1, 3), invalid, "img_latent"),
        (False, lambda r: r.inputs[1].shape.__setitem__(1, -5), invalid, "negative dimension"),
        (False, lambda r: r.outputs.add(name="sample"), invalid, 'unknown output "sample"'),
        (False, lambda r: setattr(r.parameters["wait_for_batch"], "int64_param", 1), invalid,
         "expected a bool_param"),
    ]
    inputs = random_inputs(seed=6)
    for typed, mutate, code, message in cases:
        request = infer_request(*inputs, typed=typed)
        mutate(request)
        with pytest.raises(grpc.RpcError) as error:
            oip.ModelInfer(request)
        assert error.value.code() == code and message in error.value.details(), error.value.details()
