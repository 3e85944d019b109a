"""Local throwaway stack: servers, sample data, workload and demo."""
