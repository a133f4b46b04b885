"""The fine-tuning recipe: arguments, ``main()``, callbacks and the launcher."""
