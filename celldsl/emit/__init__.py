"""Plan -> source code: one printer per target (torch, triton), each a table of function spellings."""
