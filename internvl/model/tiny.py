"""A tiny random-init checkpoint in the InternVL3 layout, for tests and the offline demo.

It uses the real model classes with small widths, and a real byte-level BPE tokenizer (the Qwen2 pre-tokenizer,
ChatML tokens and the nine InternVL tokens in official order) trained offline on a small built-in English corpus,
so every code path that runs on InternVL3-8B runs here in seconds on a CPU. Output is byte-identical for a seed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer

# The Qwen2 split rule, so the tiny tokenizer segments text the way the real one does.
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from internvl.constants import CHATML_SPECIAL_TOKENS, INTERNVL_SPECIAL_TOKENS
from internvl.model.configuration import InternVLChatConfig
from internvl.model.internvl_chat import InternVLChatModel

# Total tokenizer size, special tokens included; a multiple of 64 keeps the embedding shapes friendly.
TINY_VOCAB_SIZE = 1920
TINY_MODEL_MAX_LENGTH = 12288

TINY_CORPUS = """\
The video opens on a quiet street in the early morning. A man in a blue jacket walks a small brown dog past a row of
parked cars, and the camera follows them slowly from left to right. Light rain falls, and the road shines.
A woman rides a red bicycle across a bridge over a wide river. Boats move under the bridge while birds fly above the
water. The sky is grey at first, then the sun comes out and the colours become warm and bright.
In the kitchen, a chef cuts onions, carrots and green peppers on a wooden board. He puts them into a hot pan with oil,
stirs them for a minute, adds rice and water, and covers the pan. The steam rises while he cleans the table.
Two children play football in a park. The girl kicks the ball, the boy runs after it and falls on the grass, and both
of them laugh. Their parents sit on a bench nearby, talking and drinking coffee from paper cups.
A red circle moves from the top left corner to the bottom right corner of a white frame. A blue square appears in the
centre, grows larger, and then turns green. A yellow triangle rotates slowly while a black line crosses the screen.
Summary: a short clip of simple shapes. The shapes change colour, size and position over time, and nothing else
happens in the scene. The background stays white for the whole video.
The lecture shows a teacher writing equations on a board. She explains how to add, subtract, multiply and divide
numbers, then asks the students a question. One student raises his hand and gives the right answer: forty two.
At the airport, travellers pull suitcases through a long hall. A screen lists flights to London, Paris, Tokyo, New York
and Sydney. An announcement says that the flight at 10:45 is delayed by thirty minutes because of the weather.
The football match ends with a late goal. The home team celebrates in front of their fans, who sing and wave flags,
while the visiting players sit on the grass looking tired and disappointed.
A cat sleeps on a sofa next to an open window. A curtain moves in the wind. The cat wakes up, stretches, jumps to the
floor and walks out of the room. Later it returns with a toy mouse and lies down again.
In this documentary, scientists study the ice in the Arctic. They drill deep holes, collect long cylinders of ice and
measure the air trapped inside. The data show how the climate has changed over thousands of years.
The cooking show presents a recipe for bread: mix flour, water, salt and yeast; knead the dough for ten minutes; let
it rest for one hour; shape it; bake it at two hundred degrees until the crust is golden and crisp.
A drone flies over a green valley with a small village, a church, farms and a long road. Cows eat grass in the fields.
The drone climbs higher and shows mountains covered with snow in the distance.
Describe the video in detail. Summarize what happens. What is the main event? Who appears in the video, and what do
they do? Where does the scene take place? How does the video end? Give a short summary in one or two sentences.
The video shows a person who opens a door, enters a room, turns on the light, and sits down at a desk to read a book.
After a few pages, the person closes the book, looks out of the window, and smiles.
Frame by frame, the object moves steadily to the right. In the first frames it is small; in the last frames it fills
most of the image. The motion is smooth and there are no cuts between the shots.
Traffic moves through a busy city at night. Buses, taxis and trucks stop at a red light, then continue when it turns
green. People cross the street under tall buildings with bright signs and shop windows.
The presenter holds a new phone, shows its screen and camera, and compares the battery life with an older model.
She says the price is lower than expected and recommends it for students and travellers.
A group of friends hikes up a hill. They stop to drink water, take photos of the lake below, and continue until they
reach the top, where they eat sandwiches and watch the sunset.
Music plays while a dancer moves across an empty stage. Her movements are slow at first and then fast. The lights
change from white to purple to orange, and the audience applauds when she bows at the end.
In summary, the clip follows a single character through a simple daily routine, with calm music and soft light.
Questions and answers: Is the weather sunny? No, it is cloudy. How many people are there? There are three people.
What colour is the car? The car is silver. When does the event happen? It happens in the afternoon.
The weather report begins with a map of the country. Temperatures will fall tomorrow, with strong winds on the coast,
heavy showers in the north, and clear skies in the south. The weekend should be dry, warm and mostly sunny.
A mechanic repairs an old motorcycle in a garage. He removes the wheel, replaces the chain, tightens every bolt with a
spanner, checks the brakes, and finally starts the engine, which makes a loud and happy noise.
The nature film follows a family of elephants walking towards a waterhole during the dry season. The young calf stays
close to its mother, while lions watch from the shade of an acacia tree. At dusk the herd drinks and moves on.
An artist paints a portrait in a bright studio. She mixes colours on a palette, draws the outline of the face with a
pencil, and adds layers of paint until the eyes look alive. Visitors quietly observe her work.
During the interview, the author describes her childhood in a fishing town, her first novel, and the long journey
that brought her to the capital. She believes that reading changes people and that libraries must stay free.
A robot arm picks boxes from a conveyor belt and places them on a pallet. Sensors measure the weight and size of each
package. When a box is damaged, the system stops, flashes a warning, and waits for a worker to check it.
Snow covers the mountain village. Skiers glide down the slope, a child builds a snowman, and smoke rises from the
chimneys. In the evening, families gather around the fire, share soup and tell stories about winter.
The basketball player dribbles past two defenders, jumps, and scores just before the buzzer. The crowd stands up and
cheers. Replays show the shot from several angles in slow motion, and the commentators praise her skill.
Gardening tips: water plants early in the morning, remove dry leaves, add compost to the soil, and protect young
tomatoes from insects. Flowers such as roses, tulips and sunflowers need plenty of light.
A scientist looks through a microscope at tiny cells dividing. The image zooms in, and a narrator explains how
organisms grow, repair damage, and pass information from one generation to the next through their genes.
The train leaves the station on time. Passengers read newspapers, use laptops, or look at fields, forests and small
towns passing by. A conductor checks tickets and announces that the next stop is the central station.
Fireworks explode over the harbour at midnight. Red, gold and violet sparks fill the dark sky and reflect in the
water. Thousands of people count down together, hug each other and wish everyone a happy new year.
A tutorial explains how to assemble a wooden chair: attach the legs to the seat with four screws, fix the back rest,
check that the chair is stable, and sand any rough edges. The whole process takes about twenty minutes.
Waves crash against black rocks on a stormy beach. A lighthouse turns its beam across the sea, a fishing boat struggles
to reach the port, and seagulls circle above. Later the storm passes and the water becomes calm.
In the office, colleagues meet around a table to plan a project. They discuss the budget, the schedule, and the risks,
write tasks on sticky notes, and agree to present the results to the manager next Monday.
The marathon starts at dawn. Runners of every age pass through the old town, across the park and along the river.
Volunteers hand out water and fruit. The winner crosses the finish line in two hours and nine minutes.
A baby tries to walk for the first time. She holds the edge of the table, takes one careful step, then another, and
finally falls into her father's arms. Everyone in the room claps and laughs with joy.
Keywords: action, adventure, animal, beautiful, camera, change, clear, close, crowd, dark, early, empty, event, fast,
final, happy, heavy, large, light, local, moment, natural, night, person, quick, recent, scene, short, silent,
simple, slow, small, special, strange, strong, sudden, together, various, visible, whole, wild, young.
Roles in a chat: the system sets the rules, the user asks, the assistant answers. The user says hello, the assistant
replies, and the system message stays the same for every user and every assistant turn.
"""


def build_tiny_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2-style byte-level BPE tokenizer with ``TINY_VOCAB_SIZE`` tokens, trained on ``TINY_CORPUS``."""
    special_tokens = list(CHATML_SPECIAL_TOKENS) + list(INTERNVL_SPECIAL_TOKENS)

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE - len(special_tokens),
        # Every byte is in the alphabet, so any text (Chinese system prompts included) tokenizes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(TINY_CORPUS.splitlines(keepends=True), trainer=trainer)
    # The Python API has no getter for the merges: read vocab and merges from the serialized model.
    trained = json.loads(bpe.to_str())["model"]
    vocab = trained["vocab"]
    # Special tokens go after the BPE vocabulary, ChatML first, then the InternVL tokens, as in the official
    # tokenizer (their order fixes their ids).
    vocab.update({token: len(vocab) + i for i, token in enumerate(special_tokens)})

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(merge) for merge in trained["merges"]],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=TINY_MODEL_MAX_LENGTH,
    )
    tokenizer.add_tokens(special_tokens, special_tokens=True)
    if len(tokenizer) != TINY_VOCAB_SIZE:
        raise RuntimeError(
            f"tiny tokenizer has {len(tokenizer)} tokens, expected {TINY_VOCAB_SIZE}: the corpus is too small "
            "for the requested vocabulary"
        )
    return tokenizer


def tiny_config(vocab_size: int = TINY_VOCAB_SIZE) -> InternVLChatConfig:
    """InternVL3 settings (448-px tiles, patch 14, pixel shuffle v2, internvl2_5 template) at tiny widths.

    Linear dimensions are multiples of 64 so the 4-bit (NF4) path quantizes every LLM layer.
    """
    vision_config = dict(
        image_size=448,
        patch_size=14,
        hidden_size=64,
        intermediate_size=256,
        num_attention_heads=4,
        num_hidden_layers=2,
        qkv_bias=True,
        qk_normalization=False,
        norm_type="layer_norm",
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        drop_path_rate=0.0,
        initializer_range=0.02,
        initializer_factor=0.1,
        architectures=["InternVisionModel"],
    )
    llm_config = dict(
        architectures=["Qwen2ForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        initializer_range=0.02,
        bos_token_id=None,
        eos_token_id=None,
        use_cache=True,
    )
    return InternVLChatConfig(
        vision_config=vision_config,
        llm_config=llm_config,
        architectures=["InternVLChatModel"],
        downsample_ratio=0.5,
        force_image_size=448,
        select_layer=-1,
        ps_version="v2",
        template="internvl2_5",
        dynamic_image_size=True,
        use_thumbnail=True,
        min_dynamic_patch=1,
        max_dynamic_patch=12,
        dtype="float32",
    )


def create_tiny_model(output_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-init InternVL3-layout checkpoint (config, safetensors weights, tokenizer) to ``output_dir``.

    Files are written to a temporary directory first and moved in once complete, so an interrupted run never
    leaves a half-written checkpoint behind.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = InternVLChatModel(config)
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-") as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), output_dir / name)
    return output_dir
