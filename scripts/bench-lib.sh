# Helpers shared by the make bench scripts (bench.sh, bench-nbd.sh); sourced, not run.

# now: seconds since the epoch, with nanoseconds.
now() { date +%s.%N; }

# since <start>: seconds elapsed since <start> (from now), 3 decimals.
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f\n", b - a }'; }

# ratio <a> <b>: a / b with 2 decimals.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

# met <ratio> <goal>: "yes" when ratio ≤ goal.
met() { awk -v r="$1" -v g="$2" 'BEGIN { print (r <= g) ? "yes" : "**no**" }'; }

# median of the numbers on stdin
median() { sort -g | awk '{a[NR]=$1} END {m=int((NR+1)/2); if (NR%2) print a[m]; else printf "%.3f\n", (a[m]+a[m+1])/2}'; }

# spread of the numbers on stdin: "min–max"
spread() { sort -g | awk '{a[NR]=$1} END {printf "%s–%s", a[1], a[NR]}'; }

# bench_seconds: the time a qemu-img bench or cowdisk bench run reports (stdin).
bench_seconds() { sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p'; }
