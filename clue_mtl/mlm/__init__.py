"""Masked language modelling both recipes use: whole-word masking from jieba (`masking`), cached units and the masked-LM head (`objective`)."""
