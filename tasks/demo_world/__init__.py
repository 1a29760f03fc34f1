"""The embedded demo world: deterministic synthetic street scenes in the real datasets' layouts.

Not a stage: it makes input data, so the pipeline runs end to end (and is tested) without
downloading G50 or IM2GPS and without a GPU. `styles` says how each country looks per feature
group, `render` draws one scene with its panoptic ground truth, `world` writes the G50 and
IM2GPS layouts and publishes them atomically. One spec: `tasks.specs.DemoSpec`.
"""
