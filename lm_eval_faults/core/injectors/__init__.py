"""The injectors, one per site: persistent weight faults with an undo log, transient activation faults."""
