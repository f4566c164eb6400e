"""Python client for mmdit-serve: numpy in and out, every call's gRPC code in its exception.

    from mmdit_client import Client
    with Client("localhost:50051") as client:
        prediction = client.denoise(img_latent, txt_embed, timestep, pooled_text)
        for progress in client.generate(txt_embed, pooled_text, latent_shape=[16, 128, 128]):
            print(progress.step, progress.total_steps)
        image_latent = progress.latent

`RemoteTransformer` stands in for diffusers' SD3Transformer2DModel (see its docstring).
"""
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import grpc
import numpy as np
from google.protobuf import json_format

from mmdit_client import _tensors
from mmdit_client._generated.grpc.health.v1 import health_pb2, health_pb2_grpc
from mmdit_client._generated.mmdit.v1 import denoiser_pb2 as pb
from mmdit_client._generated.mmdit.v1 import denoiser_pb2_grpc

__all__ = ["Client", "MmditError", "Progress", "RemoteTransformer"]


class MmditError(Exception):
    """A call the server (or gRPC) refused: `code` is the grpc.StatusCode, `details` its message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass
class Progress:
    """One Generate step. `latent` is set on previews and on the last message (`done`)."""

    step: int
    total_steps: int
    sigma: float
    queue_us: int
    compute_us: int
    batch_samples: int
    latent: Optional[np.ndarray]
    done: bool


def _raise(error: grpc.RpcError):
    raise MmditError(error.code(), error.details()) from None


class Client:
    """One channel to one server. `tls`: False (plaintext) or True (the system's roots); or pass
    `root_certificates` (PEM bytes) and, for mutual TLS, `private_key` and `certificate_chain`.
    `timeout` (seconds) is every call's default deadline."""

    def __init__(self, target: str, tls: bool = False, root_certificates: Optional[bytes] = None,
                 private_key: Optional[bytes] = None, certificate_chain: Optional[bytes] = None,
                 timeout: Optional[float] = 60.0, max_message_mb: int = 64):
        options = [("grpc.max_receive_message_length", max_message_mb << 20),
                   ("grpc.max_send_message_length", max_message_mb << 20)]
        if tls or root_certificates or private_key:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self._channel = grpc.secure_channel(target, credentials, options)
        else:
            self._channel = grpc.insecure_channel(target, options)
        self._stub = denoiser_pb2_grpc.DenoiserStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout = timeout

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _deadline(self, timeout):
        return self.timeout if timeout is None else timeout

    def info(self, timeout: Optional[float] = None) -> dict:
        """GetModelInfo as a dict: model, limits, sampler (int64 fields as ints)."""
        try:
            response = self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self._deadline(timeout))
        except grpc.RpcError as error:
            _raise(error)
        info = json_format.MessageToDict(response, preserving_proto_field_name=True)
        _int64_to_int(response, info)
        return info

    def health(self, service: str = "", timeout: Optional[float] = None) -> str:
        """'SERVING' or 'NOT_SERVING' (NOT_FOUND for a service the server does not know)."""
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                          timeout=self._deadline(timeout))
        except grpc.RpcError as error:
            _raise(error)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def denoise(self, img_latent, txt_embed, timestep, pooled_text, dtype: str = "fp32",
                timeout: Optional[float] = None, wait_for_batch: bool = False, request_id: str = "") -> np.ndarray:
        """One model call on a batch: img_latent [B, C, H, W] (or [B, N, img_dim]), txt_embed
        [B, T, joint_attention_dim], timestep [B] (0..1000), pooled_text [B, pooled_dim]. Sent and
        answered in `dtype` (fp32, fp16, bf16); the prediction has img_latent's shape."""
        wire = _tensors.dtype_of(dtype)
        request = pb.DenoiseRequest(
            img_latent=_tensors.encode(img_latent, wire), txt_embed=_tensors.encode(txt_embed, wire),
            timestep=_tensors.encode(np.asarray(timestep, dtype=np.float32).reshape(-1), wire),
            pooled_text=_tensors.encode(pooled_text, wire), request_id=request_id, wait_for_batch=wait_for_batch)
        try:
            response = self._stub.Denoise(request, timeout=self._deadline(timeout))
        except grpc.RpcError as error:
            _raise(error)
        return _tensors.decode(response.prediction)

    def generate(self, txt_embed=None, pooled_text=None, latent_shape: Sequence[int] = (), negative_txt_embed=None,
                 negative_pooled_text=None, steps: int = 0, guidance_scale: Optional[float] = None, seed: int = 0,
                 initial_noise=None, init_latent=None, strength: Optional[float] = None,
                 skip_layers: Sequence[int] = (), preview_every: int = 0, dtype: str = "fp32",
                 timeout: Optional[float] = None, request_id: str = "", prompt: Optional[str] = None,
                 negative_prompt: Optional[str] = None) -> Iterator[Progress]:
        """A whole image, sampled by the server: yields one Progress per step; the last carries the
        final latent. The conditioning is either `prompt` (and `negative_prompt`, default the empty
        one), for a model with a text encoder (GetModelInfo's text_encoder), or the embeddings:
        txt_embed [1, T, joint_attention_dim], pooled_text [1, pooled_dim], and for guidance > 1
        (the default is 7) the negative pair. latent_shape [C, H, W] (image form; empty: the
        model's sample_size) or [N] (token form); the final latent is [1, C, H, W] or
        [1, N, img_dim]. Breaking out of the loop cancels the generation."""
        wire = _tensors.dtype_of(dtype)
        request = pb.GenerateRequest(latent_shape=list(latent_shape), steps=steps, seed=seed,
                                     preview_every=preview_every, output_dtype=wire, request_id=request_id)
        optional_tensors = {"txt_embed": txt_embed, "pooled_text": pooled_text,
                            "negative_txt_embed": negative_txt_embed, "negative_pooled_text": negative_pooled_text,
                            "initial_noise": initial_noise, "init_latent": init_latent}
        for field, value in optional_tensors.items():
            if value is not None:
                getattr(request, field).CopyFrom(_tensors.encode(value, pb.FP32))
        for field, value in (("guidance_scale", guidance_scale), ("strength", strength), ("prompt", prompt),
                             ("negative_prompt", negative_prompt)):
            if value is not None:
                setattr(request, field, value)
        request.skip_layer_guidance.layers.extend(skip_layers)
        stream = self._stub.Generate(request, timeout=self._deadline(timeout))
        try:
            for message in stream:
                yield Progress(step=message.step, total_steps=message.total_steps, sigma=message.sigma,
                               queue_us=message.queue_us, compute_us=message.compute_us,
                               batch_samples=message.batch_samples,
                               latent=_tensors.decode(message.latent) if message.HasField("latent") else None,
                               done=message.done)
        except grpc.RpcError as error:
            _raise(error)
        finally:
            stream.cancel()  # a no-op once the stream has ended; stops the generation if abandoned


def _int64_to_int(message, as_dict):
    """MessageToDict writes int64 fields as strings (the JSON mapping); give them back as ints."""
    for field, value in message.ListFields():
        key = field.name
        if field.message_type is not None:
            items = value if field.label == field.LABEL_REPEATED else [value]
            targets = as_dict[key] if field.label == field.LABEL_REPEATED else [as_dict[key]]
            for item, target in zip(items, targets):
                _int64_to_int(item, target)
        elif field.type in (field.TYPE_INT64, field.TYPE_UINT64, field.TYPE_SINT64, field.TYPE_FIXED64,
                            field.TYPE_SFIXED64):
            as_dict[key] = [int(v) for v in as_dict[key]] if field.label == field.LABEL_REPEATED else int(as_dict[key])


class _Output:
    """What SD3Transformer2DModel.forward returns with return_dict=True."""

    def __init__(self, sample):
        self.sample = sample

    def __getitem__(self, index):
        return (self.sample,)[index]


class RemoteTransformer:
    """A callable with the signature of diffusers' SD3Transformer2DModel.forward whose forward
    pass is the server's Denoise, so that a diffusers SD3 pipeline can use the service as its
    transformer: `pipe.transformer = RemoteTransformer(client)` (plus whatever attributes the
    pipeline reads: `config` is copied from the server's GetModelInfo, `dtype` and `device` are
    float32 and CPU, where tensors meet the wire. Pass the pipeline height and width: the
    model's default sample size is not something the server reports).

    hidden_states [B, C, H, W], encoder_hidden_states [B, T, D], pooled_projections [B, P],
    timestep [B] or a scalar: numpy arrays or torch tensors. Returns `.sample` (or a 1-tuple with
    return_dict=False) as a torch tensor of hidden_states' dtype and device when torch tensors
    came in, else as a numpy array."""

    def __init__(self, client: Client, wire_dtype: str = "fp32"):
        self.client = client
        self.wire_dtype = wire_dtype  # what travels: fp32, fp16 or bf16
        model = client.info()["model"]
        self.config = _Config(in_channels=model.get("in_channels", 0), out_channels=model.get("out_channels", 0),
                              patch_size=model.get("patch_size", 0),
                              joint_attention_dim=model.get("txt_dim", 0),
                              pooled_projection_dim=model.get("cond_dim", 0),
                              num_layers=model.get("depth", 0))

    @property
    def dtype(self):
        """What diffusers pipelines read to cast their inputs: float32 (see wire_dtype for the wire)."""
        import torch

        return torch.float32

    @property
    def device(self):
        import torch

        return torch.device("cpu")

    def __call__(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                 block_controlnet_hidden_states=None, joint_attention_kwargs=None, return_dict=True,
                 skip_layers=None, **unused):
        if block_controlnet_hidden_states is not None:
            raise NotImplementedError("RemoteTransformer: ControlNet residuals are not served")
        if skip_layers:
            raise NotImplementedError("RemoteTransformer: skip_layers per call are not served (use Generate)")
        img_latent = _to_numpy(hidden_states)
        timesteps = np.broadcast_to(_to_numpy(timestep).reshape(-1), (img_latent.shape[0],))
        sample = self.client.denoise(img_latent, _to_numpy(encoder_hidden_states), timesteps,
                                     _to_numpy(pooled_projections), dtype=self.wire_dtype)
        sample = _like(sample, hidden_states)
        return _Output(sample) if return_dict else (sample,)

    forward = __call__


@dataclass
class _Config:
    in_channels: int
    out_channels: int
    patch_size: int
    joint_attention_dim: int
    pooled_projection_dim: int
    num_layers: int


def _to_numpy(value):
    if hasattr(value, "detach"):  # a torch tensor, on any device and in any float dtype
        return value.detach().to("cpu").float().numpy()
    return np.asarray(value, dtype=np.float32)


def _like(array: np.ndarray, like):
    if hasattr(like, "detach"):
        import torch

        return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(device=like.device, dtype=like.dtype)
    return array
