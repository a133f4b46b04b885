"""The InternVL chat model: InternViT -> pixel shuffle -> ``mlp1`` -> image embeddings spliced into the LLM.

Parameter names follow the official checkpoints (``vision_model.*``, ``mlp1.*``, ``language_model.*``), so
official InternVL2.5/InternVL3 (Qwen2.5 / Llama based) directories load and save unchanged. The LLM is the
transformers model itself (``Qwen2ForCausalLM`` / ``LlamaForCausalLM``), so 4-bit loading, SDPA / flash attention,
PEFT and DeepSpeed all apply to it as to any transformers LLM.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedModel, Qwen2ForCausalLM
from transformers.utils import ModelOutput

from internvl.constants import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    VIDEO_PLACEHOLDER,
)
from internvl.conversation import get_conv_template, video_frame_prompt
from internvl.model.configuration import InternVLChatConfig
from internvl.model.vision import InternVisionModel

LLM_CLASSES = {"Qwen2ForCausalLM": Qwen2ForCausalLM, "LlamaForCausalLM": LlamaForCausalLM}

# LoRA targets of the official recipe, per LLM architecture (module-name suffixes inside the LLM).
LLM_LORA_TARGETS = {
    "Qwen2ForCausalLM": [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.down_proj",
        "mlp.up_proj",
    ],
}
LLM_LORA_TARGETS["LlamaForCausalLM"] = LLM_LORA_TARGETS["Qwen2ForCausalLM"]
BACKBONE_LORA_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def pixel_shuffle(features: torch.Tensor, scale_factor: float = 0.5, version: str = "v2") -> torch.Tensor:
    """Merge each ``k x k`` block of patch features into one token, ``k = int(1 / scale_factor)``.

    ``features`` is ``[N, H, W, C]`` (row-major patch grid). ``v2`` is a space-to-depth: output token ``(r, c)`` holds
    the features of input tokens ``(k*r + dy, k*c + dx)`` at channels ``(dy * k + dx) * C + channel``. ``v1`` (the
    official default of old checkpoints) returns the same tokens spatially transposed, ``[N, W/k, H/k, k*k*C]``.
    """
    block = int(round(1 / scale_factor))
    batch, height, width, channels = features.shape
    if height % block or width % block:
        raise ValueError(f"patch grid {height}x{width} is not divisible by the pixel-shuffle block {block}")
    blocks = features.reshape(batch, height // block, block, width // block, block, channels)
    if version == "v2":
        blocks = blocks.permute(0, 1, 3, 2, 4, 5)  # [N, H/k, W/k, dy, dx, C]
    elif version == "v1":
        blocks = blocks.permute(0, 3, 1, 2, 4, 5)  # [N, W/k, H/k, dy, dx, C]
    else:
        raise ValueError(f"ps_version must be 'v1' or 'v2', got {version!r}")
    return blocks.reshape(blocks.shape[0], blocks.shape[1], blocks.shape[2], block * block * channels)


@contextlib.contextmanager
def quiet_peft_wrapping():
    """Wrapping or loading a causal-LM adapter, without the FutureWarning peft triggers by reading transformers 5's
    deprecated ``is_gradient_checkpointing`` (nothing for users to change)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


@dataclass
class InternVLChatOutput(ModelOutput):
    """``loss`` when labels are given; ``logits`` [B, L, vocab], except in training with labels (see ``forward``)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class InternVLChatModel(PreTrainedModel):
    config_class = InternVLChatConfig
    main_input_name = "pixel_values"
    base_model_prefix = "language_model"
    _no_split_modules = ["InternVisionModel", "Qwen2DecoderLayer", "LlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    supports_gradient_checkpointing = True
    # ``forward`` takes ``num_items_in_batch``: the HF Trainer then normalizes the loss over the whole optimizer step.
    accepts_loss_kwargs = True

    def __init__(self, config: InternVLChatConfig):
        super().__init__(config)
        architecture = config.llm_config.architectures[0]
        self.vision_model = InternVisionModel(config.vision_config)
        self.language_model = LLM_CLASSES[architecture](config.llm_config)
        vit_hidden = config.vision_config.hidden_size
        llm_hidden = config.llm_config.hidden_size
        shuffled_hidden = vit_hidden * int(round(1 / config.downsample_ratio)) ** 2
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(shuffled_hidden),
            nn.Linear(shuffled_hidden, llm_hidden),
            nn.GELU(),
            nn.Linear(llm_hidden, llm_hidden),
        )
        # Set from the tokenizer by ``load_internvl_model`` (and by ``chat``).
        self.img_context_token_id: int | None = None
        # ``"system_message": null`` in a config means "use the template's own" (as the official chat does).
        self.system_message = getattr(config, "system_message", None)
        self.post_init()
        # A checkpoint saved with LoRA layers (official training output) carries them under PEFT names.
        if config.use_backbone_lora:
            self.wrap_backbone_lora(r=config.use_backbone_lora, lora_alpha=2 * config.use_backbone_lora)
        if config.use_llm_lora:
            self.wrap_llm_lora(r=config.use_llm_lora, lora_alpha=2 * config.use_llm_lora)

    # ----------------------------------------------------------------------------------------------------------
    # Configuration shortcuts (read from the config so ``config_overrides`` always apply)

    @property
    def num_image_token(self) -> int:
        return self.config.num_image_token

    @property
    def template(self) -> str:
        return self.config.template or "internvl2_5"

    @property
    def base_language_model(self) -> PreTrainedModel:
        """The transformers LLM, under any PEFT wrapper."""
        if isinstance(self.language_model, PeftModel):
            return self.language_model.get_base_model()
        return self.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.base_language_model.get_output_embeddings()

    def get_input_embeddings(self) -> nn.Module:
        return self.base_language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.base_language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.base_language_model.get_output_embeddings()

    def enable_input_require_grads(self) -> None:
        """Make the LLM's embedding output require grad, so LoRA layers inside checkpointed blocks get gradients
        while the embeddings stay frozen (the vision tower is not hooked: it runs without grad when frozen).
        Idempotent: a single hook stays registered however often it is called."""
        llm = self.base_language_model
        llm.disable_input_require_grads()
        llm.enable_input_require_grads()

    def disable_input_require_grads(self) -> None:
        self.base_language_model.disable_input_require_grads()

    @property
    def vision_encoder(self) -> nn.Module:
        """The InternViT encoder, under any PEFT wrapper."""
        vision_model = self.vision_model
        if isinstance(vision_model, PeftModel):
            vision_model = vision_model.get_base_model()
        return vision_model.encoder

    # ----------------------------------------------------------------------------------------------------------
    # Initialisation, LoRA, checkpointing

    def wrap_backbone_lora(self, r: int = 32, lora_alpha: int | None = None, lora_dropout: float = 0.05) -> None:
        """LoRA on the vision tower's qkv / proj / fc1 / fc2 (the official backbone targets); alpha defaults to 2r."""
        lora_config = LoraConfig(
            r=r,
            lora_alpha=2 * r if lora_alpha is None else lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=BACKBONE_LORA_TARGETS,
        )
        self.vision_model = get_peft_model(self.vision_model, lora_config)
        self.config.use_backbone_lora = r

    def wrap_llm_lora(self, r: int = 32, lora_alpha: int | None = None, lora_dropout: float = 0.05) -> None:
        """LoRA on the LLM's attention and MLP projections (the official targets for its architecture); alpha
        defaults to 2r, as the official recipe always passes.

        Only the LLM is wrapped, so vision modules can never match; PEFT freezes every other LLM parameter
        (embeddings and ``lm_head`` included). The embedding output is then made to require grad, which gradient
        checkpointing needs when the embeddings are frozen (4-bit models get no such hook from PEFT).
        """
        architecture = self.config.llm_config.architectures[0]
        lora_config = LoraConfig(
            r=r,
            lora_alpha=2 * r if lora_alpha is None else lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=LLM_LORA_TARGETS[architecture],
            task_type="CAUSAL_LM",
        )
        with quiet_peft_wrapping():
            self.language_model = get_peft_model(self.language_model, lora_config)
        self.enable_input_require_grads()
        self.config.use_llm_lora = r

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Checkpoint the LLM decoder layers (reentrant by default: the variant that works with PEFT + ZeRO-3) and
        the vision blocks (only used while the vision tower trains). transformers' ``activation_checkpointing_enable``
        on this model lands here too."""
        if gradient_checkpointing_kwargs is None:
            gradient_checkpointing_kwargs = {"use_reentrant": True}
        llm = self.base_language_model
        # Newer transformers hook the embeddings again inside; drop ours first so no stale hook is left behind.
        llm.disable_input_require_grads()
        enable = getattr(llm, "activation_checkpointing_enable", None)
        if enable is not None:  # the transformers >= 5.23 name
            enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)
        self.vision_encoder.gradient_checkpointing = True
        self.vision_encoder.checkpoint_kwargs = dict(gradient_checkpointing_kwargs)
        # Reentrant checkpointing drops the gradients of a block whose input does not require grad.
        self.enable_input_require_grads()

    def gradient_checkpointing_disable(self) -> None:
        llm = self.base_language_model
        disable = getattr(llm, "activation_checkpointing_disable", None) or llm.gradient_checkpointing_disable
        disable()
        self.vision_encoder.gradient_checkpointing = False

    # ----------------------------------------------------------------------------------------------------------
    # Vision features

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles ``[N, 3, S, S]`` -> LLM-space image embeddings ``[N, num_image_token, llm_hidden]``.

        Frozen parts run under ``torch.no_grad()``: nothing is stored for a backward pass that cannot use it.
        """
        vision_trainable = any(p.requires_grad for p in self.vision_model.parameters())
        projector_trainable = any(p.requires_grad for p in self.mlp1.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and vision_trainable):
            select_layer = self.config.select_layer
            vision_outputs = self.vision_model(pixel_values=pixel_values, output_hidden_states=select_layer != -1)
            if select_layer == -1:
                vit_embeds = vision_outputs.last_hidden_state
            else:
                vit_embeds = vision_outputs.hidden_states[select_layer]
            vit_embeds = vit_embeds[:, 1:, :]  # drop CLS
            side = int(vit_embeds.shape[1] ** 0.5)
            vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], side, side, -1)
            vit_embeds = pixel_shuffle(vit_embeds, self.config.downsample_ratio, self.config.ps_version)
            vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        with torch.set_grad_enabled(torch.is_grad_enabled() and (vision_trainable or projector_trainable)):
            return self.mlp1(vit_embeds.to(self.mlp1[1].weight.dtype))

    def _embed_with_images(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None,
        image_flags: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """LLM input embeddings with the image features written at the ``<IMG_CONTEXT>`` positions."""
        inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None and visual_features is None:
            vit_embeds = inputs_embeds.new_zeros(0, self.num_image_token, inputs_embeds.shape[-1])
        else:
            vit_embeds = visual_features if visual_features is not None else self.extract_feature(pixel_values)
            if image_flags is not None:
                # Text-only samples carry a dummy tile: it runs through the tower (every rank runs the same modules)
                # but its features are dropped.
                vit_embeds = vit_embeds[image_flags.reshape(-1) == 1]
        if self.img_context_token_id is None:
            raise ValueError(
                "model.img_context_token_id is not set; load the model with internvl.model.load_internvl_model "
                f"or set it to tokenizer.convert_tokens_to_ids({IMG_CONTEXT_TOKEN!r})"
            )
        selected = input_ids == self.img_context_token_id
        num_tokens = int(selected.sum())
        num_features = vit_embeds.shape[0] * vit_embeds.shape[1]
        if num_tokens != num_features:
            raise ValueError(
                f"image token / image feature mismatch: input_ids hold {num_tokens} {IMG_CONTEXT_TOKEN} tokens but "
                f"the images give {num_features} features ({vit_embeds.shape[0]} tiles x {vit_embeds.shape[1]} "
                "tokens). Usual causes: the sequence was truncated inside an image (raise max_seq_length or use "
                "fewer frames/tiles), the prompt was built with a different number of tiles than pixel_values holds, "
                "or image_flags do not match the dummy tiles."
            )
        return inputs_embeds.masked_scatter(selected.unsqueeze(-1), vit_embeds.to(inputs_embeds.dtype))

    # ----------------------------------------------------------------------------------------------------------
    # Training / scoring

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        image_flags: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        loss_weight: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | float | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_logits: bool | None = None,
        return_dict: bool | None = None,
    ) -> InternVLChatOutput | tuple:
        """Logits and, with ``labels``, the causal-LM loss, as the official model returns them.

        The loss is ``sum(loss_weight * cross_entropy) / num_items_in_batch`` over the supervised (next-token)
        positions. ``loss_weight`` (``[B, L]``, aligned with ``labels``) defaults to 1 per supervised token, and
        ``num_items_in_batch`` to the sum of those weights, so the default is the official mean over supervised
        tokens. The trainer passes the weight sum of the whole optimizer step (all accumulation steps and
        processes), which makes the loss independent of how a step is split into batches.

        In training mode with ``labels``, or with ``return_logits=False``, logits are computed only at the
        supervised positions and not returned (``logits`` is None): on video prompts of thousands of image tokens
        this avoids a [batch, length, vocab] fp32 tensor that would dominate memory. In eval mode (and with
        ``return_logits=True``) the full logits come back with the loss, for code that scores with them. Without
        labels the full logits are returned. A batch with no supervised token gives a zero loss.
        """
        if input_ids is None:
            raise ValueError("input_ids are required")
        inputs_embeds = self._embed_with_images(input_ids, pixel_values, image_flags)
        if return_logits is None:
            return_logits = labels is None or not self.training

        llm_kwargs = dict(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        loss = logits = None
        if labels is None:
            outputs = self.language_model(**llm_kwargs)
            logits = outputs.logits
        else:
            target = labels[:, 1:].to(inputs_embeds.device)
            supervised = target != IGNORE_INDEX
            if return_logits:
                outputs = self.language_model(**llm_kwargs)
                logits = outputs.logits
                supervised_logits = logits[:, :-1][supervised].float()
            else:
                outputs = self.base_language_model.model(**llm_kwargs)
                # Project only the (sample, position) pairs whose next token is supervised: their count, not
                # batch x length, sets the size of the fp32 vocabulary logits.
                supervised_logits = self.lm_head(outputs.last_hidden_state[:, :-1][supervised]).float()
            token_losses = F.cross_entropy(supervised_logits, target[supervised], reduction="none")
            weights = (
                loss_weight[:, 1:].to(token_losses.device)[supervised].float()
                if loss_weight is not None
                else torch.ones_like(token_losses)
            )
            normalizer = weights.sum() if num_items_in_batch is None else num_items_in_batch
            # Nothing supervised (weights sum to 0): a zero loss with zero gradients, not NaN.
            loss = (weights * token_losses).sum() / torch.clamp(torch.as_tensor(normalizer).to(weights), min=1e-12)
        result = InternVLChatOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return result if return_dict is not False else result.to_tuple()

    # ----------------------------------------------------------------------------------------------------------
    # Inference

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Generate from a prompt whose ``<IMG_CONTEXT>`` positions receive the images; returns the new tokens."""
        inputs_embeds = self._embed_with_images(input_ids, pixel_values, visual_features=visual_features)
        return self.language_model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            generation_config=generation_config,
            use_cache=True,
            **generate_kwargs,
        )

    def _build_query(
        self, tokenizer, question: str, history: list[tuple[str, str]] | None, num_patches_list: list[int]
    ) -> tuple[str, str]:
        """The chat prompt with each ``<image>`` expanded to its tokens, and the stop token."""
        template = get_conv_template(self.template)
        if self.system_message is not None:
            template.set_system_message(self.system_message)
        for old_question, old_answer in history or []:
            template.append_message(template.roles[0], old_question)
            template.append_message(template.roles[1], old_answer)
        template.append_message(template.roles[0], question)
        template.append_message(template.roles[1], None)
        query = template.get_prompt()
        num_placeholders = query.count(IMAGE_PLACEHOLDER)
        if num_placeholders != len(num_patches_list):
            raise ValueError(
                f"the prompt has {num_placeholders} {IMAGE_PLACEHOLDER} placeholders but num_patches_list has "
                f"{len(num_patches_list)} images"
            )
        for num_patches in num_patches_list:
            image_tokens = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (self.num_image_token * num_patches) + IMG_END_TOKEN
            query = query.replace(IMAGE_PLACEHOLDER, image_tokens, 1)
        return query, template.stop_token

    @staticmethod
    def _prepare_question(question: str, pixel_values: torch.Tensor | None, num_patches_list: list[int]) -> str:
        """Expand ``<video>`` to one ``Frame-i: <image>`` line per frame, or prepend ``<image>`` when missing."""
        if VIDEO_PLACEHOLDER in question:
            return question.replace(VIDEO_PLACEHOLDER + "\n", VIDEO_PLACEHOLDER).replace(
                VIDEO_PLACEHOLDER, video_frame_prompt(len(num_patches_list)), 1
            )
        if pixel_values is not None and IMAGE_PLACEHOLDER not in question:
            return IMAGE_PLACEHOLDER + "\n" + question
        return question

    def chat(
        self,
        tokenizer,
        pixel_values: torch.Tensor | None,
        question: str,
        generation_config: dict | None = None,
        history: list[tuple[str, str]] | None = None,
        return_history: bool = False,
        num_patches_list: list[int] | None = None,
        verbose: bool = False,
    ) -> str | tuple[str, list[tuple[str, str]]]:
        """Answer ``question`` about an image (its tiles) or a video (one tile per frame).

        For a video pass ``num_patches_list=[1] * num_frames`` and either a question with one ``Frame-i: <image>``
        line per frame or a ``<video>`` placeholder, which is expanded to those lines.
        """
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        if pixel_values is not None and sum(num_patches_list) != pixel_values.shape[0]:
            raise ValueError(
                f"num_patches_list sums to {sum(num_patches_list)} but pixel_values has {pixel_values.shape[0]} tiles"
            )
        if not history:
            question = self._prepare_question(question, pixel_values, num_patches_list)
        query, stop_token = self._build_query(tokenizer, question, history, num_patches_list)
        if verbose:
            print(query.replace(IMG_CONTEXT_TOKEN * self.num_image_token, "<IMG_CONTEXT*n>"))
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        model_inputs = tokenizer(query, return_tensors="pt")
        device = self.get_input_embeddings().weight.device
        if pixel_values is not None:
            pixel_values = pixel_values.to(device)
        generation_kwargs = dict(generation_config or {"max_new_tokens": 256, "do_sample": False})
        generation_kwargs["eos_token_id"] = tokenizer.convert_tokens_to_ids(stop_token)
        generation_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        output_ids = self.generate(
            pixel_values=pixel_values,
            input_ids=model_inputs["input_ids"].to(device),
            attention_mask=model_inputs["attention_mask"].to(device),
            **generation_kwargs,
        )
        response = tokenizer.decode(output_ids[0], skip_special_tokens=True).split(stop_token)[0].strip()
        if return_history:
            return response, [*(history or []), (question, response)]
        return response

    def batch_chat(
        self,
        tokenizer,
        pixel_values: torch.Tensor | None,
        questions: list[str],
        generation_config: dict | None = None,
        num_patches_list: list[int] | None = None,
    ) -> list[str]:
        """One answer per question; ``num_patches_list[i]`` tiles of ``pixel_values`` belong to question ``i``.

        A question with a ``<video>`` placeholder takes its tiles as frames (one tile each, ``Frame-i`` lines).
        """
        if num_patches_list is None:
            num_patches_list = [1] * len(questions) if pixel_values is not None else [0] * len(questions)
        if len(num_patches_list) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(num_patches_list)} entries in num_patches_list")
        queries = []
        stop_token = None
        for question, num_patches in zip(questions, num_patches_list, strict=True):
            patches = [num_patches] if num_patches else []
            if VIDEO_PLACEHOLDER in question:  # a video: its tiles are frames, one tile each
                patches = [1] * num_patches
                question = self._prepare_question(question, None, patches)
            elif num_patches and IMAGE_PLACEHOLDER not in question:
                question = IMAGE_PLACEHOLDER + "\n" + question
            query, stop_token = self._build_query(tokenizer, question, None, patches)
            queries.append(query)
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        padding_side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # generation continues every row from its last real token
        try:
            model_inputs = tokenizer(queries, return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = padding_side
        device = self.get_input_embeddings().weight.device
        generation_kwargs = dict(generation_config or {"max_new_tokens": 256, "do_sample": False})
        generation_kwargs["eos_token_id"] = tokenizer.convert_tokens_to_ids(stop_token)
        generation_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        output_ids = self.generate(
            pixel_values=pixel_values.to(device) if pixel_values is not None else None,
            input_ids=model_inputs["input_ids"].to(device),
            attention_mask=model_inputs["attention_mask"].to(device),
            **generation_kwargs,
        )
        responses = tokenizer.batch_decode(output_ids, skip_special_tokens=True)
        return [response.split(stop_token)[0].strip() for response in responses]
