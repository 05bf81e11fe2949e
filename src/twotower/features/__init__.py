"""Features: one encoder per feature of a tower, owning what was fitted on the training data
(``encoders``)."""
