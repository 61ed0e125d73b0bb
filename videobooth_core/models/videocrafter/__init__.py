"""VideoCrafter1 and VideoCrafter2 (AILab-CVC/VideoCrafter, Apache-2.0), reimplemented: the LVDM video UNet
(``unet``, ``attention``), the I2V image projector (``resampler``) and their configs with the released kinds as
presets (``config``). Module names mirror the released ``model.ckpt`` keys."""
