"""The protocol core: message models, framers, encryption and the transaction state machine.

Nothing in this package performs I/O or reads the clock: bytes, parsed messages and the
current time go in, events and actions come out (the style of h11).
"""
