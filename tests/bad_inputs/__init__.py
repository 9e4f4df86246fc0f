"""Bad-input corpus: builders of broken inputs and the real entry points that must reject them."""
