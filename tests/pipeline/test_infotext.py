"""Generation parameters as AUTOMATIC1111's infotext: its own text read, quotes, the schedule type."""

from latent_diffusion.pipeline.infotext import format_infotext, parse_infotext


def test_infotext_reads_a1111s_own_text_quotes_and_schedule_type():
    text = ('a "cat", at night\nmore prompt\nNegative prompt: dog\nSteps: 20, Sampler: DPM++ 2M, Schedule type: '
            'Karras, CFG scale: 7, Seed: 965400086, Size: 768x512, Model hash: 45dee52b, Model: "v1:5, pruned"')
    assert parse_infotext(text) == {"prompt": 'a "cat", at night\nmore prompt', "negative_prompt": "dog",
                                    "steps": 20, "sampler": "DPM++ 2M Karras", "guidance_scale": 7.0,
                                    "seed": 965400086, "width": 768, "height": 512, "model": "v1:5, pruned"}
    written = format_infotext("p", None, 5, "DDIM", 7.5, 1, 64, 32, model="a, b", eta=0.5)
    assert written == 'p\nSteps: 5, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 64x32, Model: "a, b", Eta: 0.5'
    assert parse_infotext(written)["model"] == "a, b"
