"""poi-bridge: a payment-terminal bridge for SaleToPOI (nexo / Terminal API) messages."""

__version__ = "0.1.0"
