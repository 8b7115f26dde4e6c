"""Pure model: fabric, policies, state machines, recovery-point math. No I/O, no project imports."""
