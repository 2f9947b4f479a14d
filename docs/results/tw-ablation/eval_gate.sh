#!/bin/bash
# Two grid cells side by side: once one cell's process holds more than LIMIT_KB (its final evaluation peaks
# near 11 GB), SIGSTOP the other cells' processes until it exits or falls below LOW_KB (hysteresis), so two
# evaluations never peak together; SIGCONT them after.
LIMIT_KB=${LIMIT_KB:-8000000}; LOW_KB=${LOW_KB:-6000000}
big=""; stopped=""
rss() { ps -o rss= -p "$1" 2>/dev/null | tr -d ' '; }
while true; do
  if [ -n "$big" ]; then
    r=$(rss $big)
    if [ -z "$r" ] || [ "$r" -lt "$LOW_KB" ]; then
      for p in $stopped; do kill -CONT $p 2>/dev/null; done
      echo "$(date +%T) $big done (rss ${r:-exited}): continued$stopped"; big=""; stopped=""
    fi
  else
    for p in $(pgrep -f "opd_agents.cli train"); do
      r=$(rss $p); [ -n "$r" ] && [ "$r" -gt "$LIMIT_KB" ] && { big=$p; break; }
    done
    if [ -n "$big" ]; then
      for p in $(pgrep -f "opd_agents.cli train"); do
        [ "$p" != "$big" ] && kill -STOP $p && stopped="$stopped $p"
      done
      echo "$(date +%T) big $big ($(rss $big) kB): stopped$stopped"
    fi
  fi
  sleep 2
done
