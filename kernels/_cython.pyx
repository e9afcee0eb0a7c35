def set_num_threads(int n):
    pass
