"""Frames to vision tokens: CLIP preprocessing, the truncated vision tower and the pooling pyramid.

It knows nothing of the memory, the LLM or where frames come from: it turns RGB arrays into token grids.
"""
