"""audioldm2-core: a from-scratch, readable PyTorch implementation of AudioLDM 2 inference.

    from audioldm2_core import AudioLDM2
    pipe = AudioLDM2.from_pretrained("cvssp/audioldm2")
    out = pipe("a dog barking in the rain", num_inference_steps=200, audio_length_in_s=10.24)
    out.audios[0], out.sample_rate   # float32 waveform, 16000

One file per component, in data-flow order: tokenization, clap_text, t5, projection, gpt2, conditioning
(encode_prompt), unet, samplers, vae, vocoder, pipeline, cli; clap_audio, audio and rerank for CLAP
candidate re-ranking; config (hub config translation) and loading (checkpoint resolution, strict loading).
"""

from .pipeline import AudioLDM2, AudioOutput

__all__ = ["AudioLDM2", "AudioOutput"]
__version__ = "0.1.0"
