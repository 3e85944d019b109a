"""Pure logic shared by the daemons and the simulator.

Nothing under this package performs I/O or imports asyncio, logging, time, random or a driver;
a test walks the imports to keep it that way. Time and chance are passed in by the caller.
"""
