from .reference import sliding_window_attention_reference

__all__ = ["sliding_window_attention_reference"]
