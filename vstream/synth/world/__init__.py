"""A procedural streaming world: seeded streams of coloured shapes, their events, frames and questions.

A stream is a timeline. One to three filled shapes (circle, square, triangle in six colours) move slowly over a plain
background; objects appear and disappear, change colour (`recolour`), and a `scene` change swaps the background and
every object at once. The package is split by job:

- `timeline`: `generate_stream(seed)` builds a `WorldTimeline` (events, object tracks, backgrounds) from the seed alone;
- `render`: the `Scene` at one moment drawn as a frame (`render`) or a per-pixel label map (`label_map`);
- `questions`: `make_questions` asks `WorldQuestion`s answerable from the frames sampled at 1 fps up to their time
  (`questions_at`: some at one given time),
  each type designed to need one part of the memory (spatial, temporal, abstract, retrieved);
- `dataset`: split seed ranges, a stream's H.264 video and `write_dataset` (videos, timelines, LLaVA training records
  and VStream-QA test records).

The names callers use are importable from here. This package does not decode video and knows nothing about models,
tokenizers or prompts.
"""

from vstream.synth.world.dataset import SPLIT_SEEDS, split_seeds, write_dataset, write_stream_video
from vstream.synth.world.questions import QUESTION_TYPES, WorldQuestion, make_questions, questions_at
from vstream.synth.world.render import (
    BACKGROUNDS,
    COLOUR_NAMES,
    OBJECT_COLOURS,
    SHAPES,
    Scene,
    SceneObject,
    label_map,
    label_name,
    label_of,
    render,
)
from vstream.synth.world.timeline import (
    MAX_PAIRS,
    MIN_DURATION,
    SIZE_RANGE,
    SPEED_RANGE,
    Event,
    ObjectTrack,
    WorldTimeline,
    generate_stream,
)

__all__ = [
    "BACKGROUNDS", "COLOUR_NAMES", "MAX_PAIRS", "MIN_DURATION", "OBJECT_COLOURS", "QUESTION_TYPES", "SHAPES",
    "SIZE_RANGE", "SPEED_RANGE", "SPLIT_SEEDS", "Event", "ObjectTrack", "Scene", "SceneObject", "WorldQuestion",
    "WorldTimeline", "generate_stream", "label_map", "label_name", "label_of", "make_questions", "questions_at",
    "render", "split_seeds", "write_dataset", "write_stream_video",
]
