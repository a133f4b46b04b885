"""Chat templates, by the official InternVL names.

Only what InternVL fine-tuning and inference use is here: a system block, two roles and a separator
(the "MPT" style of the official code). ``get_conv_template`` returns a fresh copy, so callers may
append messages freely.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from internvl.constants import IMAGE_PLACEHOLDER

INTERNVL_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
LEGACY_INTERNVL_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)


@dataclass
class Conversation:
    """A rendered-as-text chat: ``system_template`` + ``sep``, then ``role + text + sep`` per message.

    An assistant message of ``None`` renders only the role: the generation prompt.
    """

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    sep: str
    messages: list[list] = field(default_factory=list)

    def set_system_message(self, message: str) -> None:
        self.system_message = message

    def append_message(self, role: str, message: str | None) -> None:
        self.messages.append([role, message])

    @property
    def system_prompt(self) -> str:
        return self.system_template.format(system_message=self.system_message) + self.sep

    @property
    def stop_token(self) -> str:
        """The token generation stops on (``<|im_end|>`` for ChatML templates)."""
        return self.sep.strip()

    def get_prompt(self) -> str:
        parts = [self.system_prompt]
        for role, message in self.messages:
            parts.append(role + message + self.sep if message is not None else role)
        return "".join(parts)

    def copy(self) -> "Conversation":
        return copy.deepcopy(self)


def video_frame_prompt(num_frames: int) -> str:
    """The official per-frame lines that replace ``<video>``: ``Frame-1: <image>`` ... one per line."""
    return "".join(f"Frame-{i}: {IMAGE_PLACEHOLDER}\n" for i in range(1, num_frames + 1))


_TEMPLATES: dict[str, Conversation] = {}


def register_conv_template(template: Conversation) -> None:
    if template.name in _TEMPLATES:
        raise ValueError(f"chat template {template.name!r} is already registered")
    _TEMPLATES[template.name] = template


def get_conv_template(name: str) -> Conversation:
    """A fresh copy of the template registered as ``name``."""
    try:
        return _TEMPLATES[name].copy()
    except KeyError:
        raise ValueError(
            f"unknown chat template {name!r}; known: {', '.join(sorted(_TEMPLATES))}. "
            "InternVL2.5 and InternVL3 checkpoints use 'internvl2_5'."
        ) from None


_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")

register_conv_template(
    Conversation(
        name="internvl2_5",
        system_template="<|im_start|>system\n{system_message}",
        system_message=INTERNVL_SYSTEM_MESSAGE,
        roles=_CHATML_ROLES,
        sep="<|im_end|>\n",
    )
)
# The older InternVL2 templates: the same ChatML text without the newline after <|im_end|>.
for _name in ("Hermes-2", "internlm2-chat"):
    register_conv_template(
        Conversation(
            name=_name,
            system_template="<|im_start|>system\n{system_message}",
            system_message=LEGACY_INTERNVL_SYSTEM_MESSAGE,
            roles=_CHATML_ROLES,
            sep="<|im_end|>",
        )
    )
register_conv_template(
    Conversation(
        name="phi3-chat",
        system_template="<|system|>\n{system_message}",
        system_message=LEGACY_INTERNVL_SYSTEM_MESSAGE,
        roles=("<|user|>\n", "<|assistant|>\n"),
        sep="<|end|>",
    )
)
